"""Units of the worker dispatch (shell/dispatch.py) and the shared resumption cache (shell/workers.py)."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from nfq_tcpcrypt.core.constants import Aead, Role, Tep
from nfq_tcpcrypt.core.resumption import ResumptionCache
from nfq_tcpcrypt.shell import dispatch, rules
from nfq_tcpcrypt.shell.workers import RemoteCache, serve_cache


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("workers", [2, 3, 8, 64])
def test_programs_fit_xt_bpf(family: str, workers: int) -> None:
    for k in range(workers):
        text = dispatch.program(family, workers, k)
        count, *instructions = text.split(",")
        assert int(count) == len(instructions) <= 64  # XT_BPF_MAX_NUM_INSTR
        assert all(len(ins.split()) == 4 for ins in instructions)


@pytest.mark.parametrize(
    ("src", "dst"), [("10.77.1.1", "10.77.2.2"), ("fd77:1::1", "fd77:2::2"), ("192.0.2.1", "198.51.100.7")]
)
def test_worker_of_is_symmetric_and_spreads(src: str, dst: str) -> None:
    seen = set()
    for sport in range(40000, 40200):
        k = dispatch.worker_of(src, sport, dst, 443, 4)
        assert k == dispatch.worker_of(dst, 443, src, sport, 4)
        seen.add(k)
    assert seen == {0, 1, 2, 3}  # the ports matter, not only the addresses


def test_rules_per_worker() -> None:
    params = rules.RuleParams(7100, 7101, 0x7463, mode="gateway", outside=("wan0",), workers=3)
    text = rules.render("ipv4", params)
    queued = [line for line in text.splitlines() if "NFQUEUE" in line and "_ENCQ_" not in line]
    assert [line.split("--queue-num ")[1].split()[0] for line in queued] == ["7100", "7102", "7104",
                                                                            "7101", "7103", "7105"]
    # the last worker takes what the others did not match: no packet leaves a chain unqueued
    assert ["-m bpf" in line for line in queued] == [True, True, False, True, True, False]
    # encrypted connections go to the same outbound queues, never bypassed (fail closed)
    encrypted = [line for line in text.splitlines() if "NFQUEUE" in line and "_ENCQ_" in line]
    assert [line.split("--queue-num ")[1].split()[0] for line in encrypted] == ["7101", "7103", "7105"]
    assert not any("--queue-bypass" in line for line in encrypted)
    assert rules.render("ipv4", rules.RuleParams(7100, 7101, 0x7463)).count("NFQUEUE") == 3  # in, out, encrypted
    with pytest.raises(rules.RulesError):
        rules.RuleParams(7100, 7101, 0x7463, workers=65)


def _supervisor(cache: ResumptionCache, sock: socket.socket, delay_first: list[float]) -> None:
    while True:
        data = sock.recv(65536)
        if not data:
            return
        reply = serve_cache(cache, json.loads(data))
        if delay_first:
            threading.Event().wait(delay_first.pop())
        if reply is not None:
            sock.send(json.dumps(reply).encode())


def test_a_secret_stored_by_one_worker_resumes_on_another() -> None:
    """Worker 0 stores; worker 1 offers it (burned: never twice); the peer's half is answered once."""
    cache = ResumptionCache()
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
    for parent, _ in pairs:
        threading.Thread(target=_supervisor, args=(cache, parent, []), daemon=True).start()
    w0, w1 = (RemoteCache(child) for _, child in pairs)
    peer = bytes([10, 77, 2, 2])
    w0.store(peer, bytes(range(32)), Tep.X25519, Aead.AES_128_GCM, Role.A, now=100.0)
    assert len(w0.info(100.0)) == 1  # answered after the store, on the same socket: it is in
    offer = w1.take_for_offer(peer, (Tep.X25519,), now=101.0)
    assert offer is not None and offer.tep is Tep.X25519 and offer.original_role is Role.A
    again = w0.take_for_offer(peer, (Tep.X25519,), now=101.0)
    assert again is not None and again.ss != offer.ss  # the next secret, ss[i+1]
    assert w0.info(101.0)[0]["resumptions"] == 2 and "ss" not in json.dumps(w0.info(101.0))
    assert w1.flush() == 1 and w0.take_for_offer(peer, (Tep.X25519,), now=102.0) is None
    for _, child in pairs:
        child.close()


def test_a_late_answer_is_not_taken_for_the_next_one() -> None:
    cache = ResumptionCache()
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    threading.Thread(target=_supervisor, args=(cache, parent, [0.5]), daemon=True).start()
    remote = RemoteCache(child, timeout=0.1)
    peer = bytes([10, 0, 0, 1])
    cache.store(peer, bytes(32), Tep.X25519, Aead.AES_128_GCM, Role.B, 0.0)
    assert remote.take_for_offer(peer, (Tep.X25519,), now=1.0) is None  # timed out: a fresh exchange
    assert remote.failures == 1
    threading.Event().wait(0.6)
    remote.timeout = 2.0
    assert remote.take_for_offer(bytes([10, 0, 0, 2]), (Tep.X25519,), now=1.0) is None  # not the late one
    child.close()


def test_sighup_gives_the_shared_cache_the_new_ttl_and_size(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from nfq_tcpcrypt.shell import settings
    from nfq_tcpcrypt.shell.workers import Supervisor

    path = tmp_path / "c.toml"
    path.write_text("resume-ttl = 600\n")
    options = settings.options_from(settings.load_file(str(path)), {})
    options.config_file = str(path)
    supervisor = Supervisor(options, 2)  # no worker is forked before spawn()
    assert supervisor.cache.ttl == 600
    path.write_text("resume-ttl = 60\nresume-cache-size = 10\n")
    supervisor.reload_cache_settings()
    assert (supervisor.cache.ttl, supervisor.cache.max_entries) == (60, 10)
    path.write_text("resume-ttl = 'soon'\n")
    supervisor.reload_cache_settings()  # a bad file: logged, nothing changes
    assert (supervisor.cache.ttl, supervisor.cache.max_entries) == (60, 10)


def test_a_worker_engine_with_the_supervisors_cache_still_works_ahead() -> None:
    """A worker's engine holds the supervisor's cache (RemoteCache, filled there on demand): its
    idle work (Engine.prepare) skips the cache and does the rest."""
    from nfq_tcpcrypt.core.engine import Engine
    from nfq_tcpcrypt.core.kex import KeyPool

    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    engine = Engine()
    engine.cache = RemoteCache(child)  # type: ignore[assignment]  # as shell/workers.py does
    engine.keys = KeyPool(size=1)
    assert not engine.prepare_wanted(0.0) and not engine.prepare(0.0)
    engine.keys.take(engine.config.key_factory, Tep.X25519, 0.0)  # a connection asked for a key
    assert engine.prepare_wanted(0.0) and engine.prepare(0.0) and len(engine.keys) == 1
    parent.close()
    child.close()
