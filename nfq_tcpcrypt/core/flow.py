"""Flow keys and directions: how the core names a connection and a packet's way."""

from __future__ import annotations

import ipaddress
from enum import Enum
from typing import NamedTuple


class Direction(Enum):
    """Which way a packet travels, relative to the local (plaintext) side."""

    OUTBOUND = "outbound"  # local stack -> wire: encrypt
    INBOUND = "inbound"  # wire -> local stack: decrypt


class FlowKey(NamedTuple):
    """A connection's 4-tuple as seen on the local side (addresses as packed bytes)."""

    local_ip: bytes
    local_port: int
    remote_ip: bytes
    remote_port: int

    @property
    def local(self) -> str:
        """The local endpoint as "ip:port" ("[ip]:port" for IPv6)."""
        return format_endpoint(self.local_ip, self.local_port)

    @property
    def remote(self) -> str:
        """The remote endpoint as "ip:port" ("[ip]:port" for IPv6)."""
        return format_endpoint(self.remote_ip, self.remote_port)

    def __str__(self) -> str:
        return f"{self.local}<->{self.remote}"


def as_flow(key: tuple[bytes, int, bytes, int]) -> FlowKey:
    """The FlowKey equal to a plain 4-tuple, made without the NamedTuple's `__new__` (interpreted
    Python, also when compiled): one is made for every SYN."""
    return tuple.__new__(FlowKey, key)


def format_endpoint(ip: bytes, port: int) -> str:
    """"ip:port", or "[ip]:port" for IPv6: how sessions, reports and tools write an endpoint."""
    address = ipaddress.ip_address(ip)
    if address.version == 6:
        return f"[{address}]:{port}"
    return f"{address}:{port}"
