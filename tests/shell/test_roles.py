"""The labs' role files (`nfq_tcpcrypt/roles/`): shipped with the package, valid `--config` files.

The namespace lab (`nfq-tcpcrypt lab`) and the Vagrant lab (vagrant/) start their daemons with them;
the command line overrides what differs between the two (README "Config file").
"""

from __future__ import annotations

import pytest

from nfq_tcpcrypt.lab.demo import role_file
from nfq_tcpcrypt.shell.settings import ConfigError, load_file, options_from


@pytest.mark.parametrize("role", ["host", "gateway"])
def test_role_file_ships_with_the_package(role: str) -> None:
    path = role_file(role)
    assert path.is_file(), path
    assert path.parent.name == "roles" and path.parent.parent.name == "nfq_tcpcrypt"


def test_host_role() -> None:
    options = options_from(load_file(str(role_file("host"))), {})
    assert options.mode == "host" and options.outside == ()
    assert (options.teps, options.aeads) == ("x25519", "aes128gcm")
    assert options.keylog == "/var/lib/nfq-tcpcrypt/keys.log"


def test_gateway_role_and_command_line_overrides() -> None:
    values = load_file(str(role_file("gateway")))
    options = options_from(values, {})
    assert options.mode == "gateway" and options.outside == ("wan0",)
    assert (options.teps, options.aeads) == ("x25519", "aes128gcm")
    # A namespace topology names its own outside interface, key log and control socket.
    options = options_from(values, {"outside": "veth-gaw", "keylog": "/tmp/ga.keys", "control": "/tmp/ga.sock"})
    assert options.outside == ("veth-gaw",) and options.keylog == "/tmp/ga.keys" and options.control == "/tmp/ga.sock"
    # The gateway role cannot run in host mode: its outside interface is refused there.
    with pytest.raises(ConfigError, match="gateway mode only"):
        options_from(values, {"mode": "host"})
