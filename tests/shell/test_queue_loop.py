"""QueuePair and EventLoop driven by a fake queue: one verdict per packet, the drain budget, and the
order of verdicts, injections and timers. The real binding runs in tests/integration."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import pytest

from nfq_tcpcrypt.core.flow import Direction
from nfq_tcpcrypt.core.verdict import Action, Injection, Verdict
from nfq_tcpcrypt.shell import nfq
from nfq_tcpcrypt.shell.collector import Collector
from nfq_tcpcrypt.shell.loop import EventLoop, SignalWatch
from nfq_tcpcrypt.shell.nfq import QueuePair
from nfq_tcpcrypt.shell.passthrough import PassThroughEngine

PACKET = bytes([0x45, 0, 0, 40]) + bytes(36)  # an IPv4 header claiming 40 bytes, and 40 bytes


class FakePacket:
    """Records its verdict; a second verdict is an error, as in NetfilterQueue."""

    def __init__(self, payload: bytes, log: list[tuple[str, Any]], copy_len: int | None = None) -> None:
        self.payload = payload
        self.copy_len = len(payload) if copy_len is None else copy_len
        self.log = log
        self.verdict: str | None = None
        self.new_payload: bytes | None = None
        self.mark = 0  # the connection's mark as CONNMARK restored it (0: never encrypted)

    def get_mark(self) -> int:
        return self.mark

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def get_payload(self) -> bytes:
        return self.payload

    def get_payload_len(self) -> int:
        return self.copy_len

    def set_payload(self, data: bytes) -> None:
        assert isinstance(data, bytes)  # the real binding refuses a bytearray
        self.new_payload = data

    def _give(self, verdict: str) -> None:
        if self.verdict is not None:
            raise RuntimeError("Verdict already given for this packet")
        self.verdict = verdict
        self.log.append(("verdict", self))

    def accept(self) -> None:
        self._give("accept")

    def drop(self) -> None:
        self._give("drop")


class FakeQueue:
    """The NetfilterQueue surface QueuePair uses; `get_fd` is readable while packets wait."""

    def __init__(self) -> None:
        self.pending: list[FakePacket] = []
        self.callback: Callable[[Any], None] | None = None
        self.num: int | None = None
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)

    def bind(self, num: int, callback: Callable[[Any], None], max_len: int, sock_len: int) -> None:
        self.num, self.callback = num, callback

    def unbind(self) -> None:
        self._reader.close()
        self._writer.close()

    def get_fd(self) -> int:
        return self._reader.fileno()

    def put(self, packet: FakePacket) -> None:
        self.pending.append(packet)
        self._writer.send(b"x")

    def run(self, block: bool = True) -> None:
        assert block is False and self.callback is not None
        while self.pending:
            self._reader.recv(1)
            self.callback(self.pending.pop(0))  # exceptions propagate, as in NetfilterQueue >= 1.0


def make_pair(handler: Callable[..., Verdict], after: Callable[[], None] = lambda: None):
    made: list[FakeQueue] = []

    def factory() -> FakeQueue:
        made.append(FakeQueue())
        return made[-1]

    counters: dict[str, int] = {}
    pair = QueuePair(7100, handler, counters, after, factory)
    return pair, made, counters


class TestQueuePair:
    def test_binds_inbound_then_outbound(self) -> None:
        pair, made, _ = make_pair(lambda p, d, e=False, i=None: Verdict(Action.ACCEPT))
        assert [q.num for q in made] == [7100, 7101]
        assert pair.queues[Direction.INBOUND] is made[0] and pair.queues[Direction.OUTBOUND] is made[1]
        assert set(pair.fds().values()) == {Direction.INBOUND, Direction.OUTBOUND}
        pair.close()

    def test_exactly_one_verdict_per_packet_whatever_the_handler_does(self) -> None:
        log: list[tuple[str, Any]] = []
        results = iter([Verdict(Action.ACCEPT), Verdict(Action.DROP), Verdict(Action.ACCEPT, b"new"), None])

        def handler(payload: bytes, direction: Direction, encrypted: bool = False, info: Any = None) -> Verdict:
            result = next(results)
            if result is None:
                raise ValueError("engine bug")
            return result

        pair, made, counters = make_pair(handler)
        packets = [FakePacket(PACKET, log) for _ in range(4)]
        for packet in packets:
            made[0].put(packet)
        pair.drain(Direction.INBOUND)
        assert [p.verdict for p in packets] == ["accept", "drop", "accept", "drop"]
        assert packets[2].new_payload == b"new"
        assert counters["handler_errors"] == 1 and counters["packets_inbound"] == 4
        pair.close()

    def test_truncated_copy_is_accepted_unchanged_without_the_handler(self) -> None:
        log: list[tuple[str, Any]] = []
        seen: list[bytes] = []
        pair, made, counters = make_pair(lambda p, d, e=False, i=None: seen.append(p) or Verdict(Action.DROP))
        packet = FakePacket(PACKET, log, copy_len=36)
        made[1].put(packet)
        pair.drain(Direction.OUTBOUND)
        assert packet.verdict == "accept" and packet.new_payload is None and not seen
        assert counters["truncated_accepted"] == 1
        pair.close()

    def test_drain_budget_returns_control_and_loses_nothing(self) -> None:
        log: list[tuple[str, Any]] = []
        pair, made, counters = make_pair(lambda p, d, e=False, i=None: Verdict(Action.ACCEPT))
        packets = [FakePacket(PACKET, log) for _ in range(nfq.DRAIN_BUDGET * 2 + 5)]
        for packet in packets:
            made[0].put(packet)
        pair.drain(Direction.INBOUND)
        assert sum(p.verdict is not None for p in packets) == nfq.DRAIN_BUDGET
        assert counters["drain_budget_spent"] == 1
        pair.drain(Direction.INBOUND)
        pair.drain(Direction.INBOUND)
        assert all(p.verdict == "accept" for p in packets)
        assert len(log) == len(packets)  # one verdict each, never two
        pair.close()

    def test_after_runs_after_each_verdict(self) -> None:
        log: list[tuple[str, Any]] = []
        pair, made, _ = make_pair(lambda p, d, e=False, i=None: Verdict(Action.ACCEPT),
                                  after=lambda: log.append(("after", None)))
        for _ in range(3):
            made[0].put(FakePacket(PACKET, log))
        pair.drain(Direction.INBOUND)
        assert [kind for kind, _ in log] == ["verdict", "after"] * 3
        pair.close()


class MarkRecordingPacket(FakePacket):
    def set_mark(self, mark: int) -> None:
        self.log.append(("set_mark", mark))
        super().set_mark(mark)


@pytest.mark.parametrize("arrives_marked", [False, True])
def test_encrypted_verdict_sets_the_mark_only_when_the_packet_lacks_it(arrives_marked: bool) -> None:
    log: list[tuple[str, Any]] = []
    pair, made, _ = make_pair(lambda *args: Verdict(Action.ACCEPT, PACKET[:-1] + b"\x09", encrypted=True))
    packet = MarkRecordingPacket(PACKET, log)
    packet.mark = 0x5 | (nfq.ENCRYPTED_MARK if arrives_marked else 0)
    made[1].put(packet)
    pair.drain(Direction.OUTBOUND)
    assert packet.verdict == "accept" and packet.new_payload == PACKET[:-1] + b"\x09"
    assert packet.mark == 0x5 | nfq.ENCRYPTED_MARK  # other bits kept
    # An outbound packet of an encrypted connection comes marked (the rules): its verdict sets none.
    assert [entry for entry in log if entry[0] == "set_mark"] == ([] if arrives_marked else [("set_mark", packet.mark)])
    pair.close()


class FakeInjector:
    def __init__(self, log: list[tuple[str, Any]]) -> None:
        self.log = log
        self.sent = self.sent_local = self.failed = 0

    def send(self, packet: bytes, direction: Direction = Direction.OUTBOUND) -> bool:
        self.log.append(("inject", packet))
        self.sent += 1
        return True


class FakeEngine(PassThroughEngine):
    """Each packet asks for one injection; a timer is due once; after `stop_after` packets, SIGTERM."""

    def __init__(self, log: list[tuple[str, Any]], stop_after: int, now_deadline: float,
                 inject: tuple[Direction, ...] = (Direction.OUTBOUND,)) -> None:
        super().__init__()
        self.inject_ways = inject
        self.log = log
        self.counters: dict[str, int] = {"packets": 0}
        self.stop_after = stop_after
        self._inject: list[Injection] = []
        self._timer: float | None = now_deadline

    def process(self, packet: bytes, direction: Direction, now: float, encrypted: bool = False,
                info: Any = None) -> Verdict:
        self.counters["packets"] += 1
        self.log.append(("process", packet))
        for way in self.inject_ways:
            self._inject.append(Injection(b"made-by-" + packet[-1:] + way.value[:1].encode(), way))
        if self.counters["packets"] == self.stop_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return Verdict(Action.ACCEPT)

    def segments_to_inject(self) -> list[Injection]:
        out, self._inject = self._inject, []
        return out

    def get_timer(self) -> float | None:
        return self._timer

    def handle_timer(self, now: float) -> None:
        self.log.append(("timer", now))
        self._timer = None


def _run_three_packets(engine: FakeEngine, log: list[tuple[str, Any]],
                       collector: Collector | None = None) -> tuple[EventLoop, list[FakePacket]]:
    """Three packets waiting on the inbound queue, then the loop (with `collector` at its idle
    point, if given) until a SIGTERM; the loop comes back closed."""
    made: list[FakeQueue] = []

    def factory() -> FakeQueue:
        made.append(FakeQueue())
        return made[-1]

    signals = SignalWatch()
    try:
        loop = EventLoop(engine, 7100, FakeInjector(log), signals, queue_factory=factory)  # type: ignore[arg-type]
        packets = [FakePacket(PACKET[:-1] + bytes([i]), log) for i in (1, 2, 3)]
        for packet in packets:
            made[0].put(packet)
        loop.collector = collector
        assert loop.run() == signal.SIGTERM  # a timeout here: nothing sent the SIGTERM
        loop.close()
    finally:
        signals.close()
    return loop, packets


@pytest.mark.timeout(30)
def test_event_loop_verdict_then_injection_then_timer_and_stops_on_sigterm() -> None:
    log: list[tuple[str, Any]] = []
    engine = FakeEngine(log, stop_after=3, now_deadline=0.0)  # a timer already due
    loop, packets = _run_three_packets(engine, log)
    kinds = [kind for kind, _ in log]
    # Each packet (inbound): the engine, then what it injects toward the wire (the other way:
    # no order to keep with the packet's verdict, and it may be on the critical path), the verdict.
    assert kinds[:9] == ["process", "inject", "verdict"] * 3, kinds
    injected = [payload for kind, payload in log if kind == "inject"]
    assert injected == [b"made-by-\x01o", b"made-by-\x02o", b"made-by-\x03o"]
    assert kinds.count("timer") == 1 and kinds.index("timer") > 8  # timers after the wakeup's packets
    assert all(p.verdict == "accept" for p in packets)
    assert loop.all_counters()["shell.packets_inbound"] == 3



@pytest.mark.timeout(30)
def test_injections_of_the_packets_own_way_follow_its_verdict() -> None:
    log: list[tuple[str, Any]] = []
    engine = FakeEngine(log, stop_after=3, now_deadline=0.0, inject=(Direction.INBOUND, Direction.OUTBOUND))
    _run_three_packets(engine, log)
    kinds = [kind for kind, _ in log]
    # Inbound packets: toward the wire before the verdict, toward our stack after it, in order.
    assert kinds[:12] == ["process", "inject", "verdict", "inject"] * 3, kinds
    injected = [payload for kind, payload in log if kind == "inject"]
    assert injected == [b"made-by-" + bytes([i]) + way for i in (1, 2, 3) for way in (b"o", b"i")]


class PreparingEngine(FakeEngine):
    """Wants two pieces of work done ahead (Engine.prepare); the first injects (a key exchange
    that failed there resets its connection); SIGTERM after the second."""

    def __init__(self, log: list[tuple[str, Any]]) -> None:
        super().__init__(log, stop_after=0, now_deadline=0.0)
        self._timer = None
        self.wanted = 2

    def prepare_wanted(self, now: float) -> bool:
        return self.wanted > 0

    def prepare(self, now: float) -> bool:
        self.log.append(("prepare", now))
        if self.wanted == 2:
            self._inject.append(Injection(b"reset", Direction.OUTBOUND))
        self.wanted -= 1
        if not self.wanted:
            os.kill(os.getpid(), signal.SIGTERM)
        return True


@pytest.mark.timeout(30)
def test_event_loop_prepares_only_while_no_packet_waits() -> None:
    log: list[tuple[str, Any]] = []
    engine = PreparingEngine(log)
    _run_three_packets(engine, log)
    kinds = [kind for kind, _ in log]
    # The waiting packets first (verdicts and injections), the work ahead once the queues are
    # empty, and what that work injects at once, not at the next wakeup.
    assert kinds == ["process", "inject", "verdict"] * 3 + ["prepare", "inject", "prepare"], kinds
