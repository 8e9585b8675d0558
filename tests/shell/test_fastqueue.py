"""The fast queue backend without root: its netlink messages byte by byte (decoded here independently of
the codec), the packets it parses from kernel-shaped messages, the C module's reading and verdicts
against the Python ones (_fastio.c), and FastQueue's verdict batching driven through a fake socket
(the Python path) and through a datagram socketpair (the C path, in a compiled build). The binding
against the kernel runs in tests/integration/test_fast_backend.py and, with
NFQ_TCPCRYPT_QUEUE_BACKEND=fast, the whole integration suite."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfq_tcpcrypt.core.flow import Direction
from nfq_tcpcrypt.core.verdict import Action, Injection, PacketInfo, Verdict
from nfq_tcpcrypt.shell import fastqueue
from nfq_tcpcrypt.shell import nfnetlink as nl
from nfq_tcpcrypt.shell.fastqueue import FastPacket, FastQueue, factory
from nfq_tcpcrypt.shell.nfq import QueuePair, packet_info, queue_factory

IP_PACKET = bytes([0x45, 0, 0, 40]) + bytes(36)  # an IPv4 header claiming 40 bytes, and 40 bytes


def decode(data: bytes) -> list[tuple[int, int, int, dict[int, bytes]]]:
    """(type, flags, queue, {attribute: value}) of each message in `data`, read without the codec."""
    out = []
    offset = 0
    while offset < len(data):
        length, kind, flags, _seq, _pid = struct.unpack_from("=IHHII", data, offset)
        assert length >= 20 and offset + length <= len(data)
        family, version, queue = struct.unpack_from("!BBH", data, offset + 16)
        assert (family, version) == (0, 0)
        attrs: dict[int, bytes] = {}
        pos = offset + 20
        while pos < offset + length:
            alen, akind = struct.unpack_from("=HH", data, pos)
            attrs[akind] = data[pos + 4 : pos + alen]
            pos += (alen + 3) & ~3
        assert pos == offset + length  # padded to the end of the message
        out.append((kind, flags, queue, attrs))
        offset += length
    return out


def kernel_packet(packet_id: int, payload: bytes, queue: int = 7100, skb_info: int | None = None,
                  cap_len: int | None = None, mark: int = 0) -> bytes:  # fmt: skip
    """A NFQNL_MSG_PACKET as the kernel builds it (nfqnl_build_packet_message: header first,
    payload last, other attributes between)."""
    attrs = nl.attr(nl.NFQA_PACKET_HDR, struct.pack("!IHBx", packet_id, 0x0800, 3))
    attrs += nl.attr(nl.NFQA_IFINDEX_OUTDEV, struct.pack("!I", 2))
    attrs += nl.attr(nl.NFQA_MARK, struct.pack("!I", mark))
    attrs += nl.attr(0x4000 | 4, bytes(16))  # a timestamp, with the net-byte-order bit the kernel sets
    if skb_info is not None:
        attrs += nl.attr(nl.NFQA_SKB_INFO, struct.pack("!I", skb_info))
    if cap_len is not None:
        attrs += nl.attr(nl.NFQA_CAP_LEN, struct.pack("!I", cap_len))
    attrs += nl.attr(nl.NFQA_PAYLOAD, payload)
    return nl.message(nl.NFQNL_MSG_PACKET, queue, attrs, flags=0)


def one(data: bytes) -> tuple[int, bytes, int, int, int] | None:
    """single_packet of a whole datagram, its payload offsets turned into the payload's bytes."""
    fields = nl.single_packet(bytearray(data), len(data))
    if fields is None:
        return None
    packet_id, start, end, cap_len, skb_info, mark = fields
    return packet_id, data[start:end], cap_len, skb_info, mark


def ack(seq: int, error: int = 0) -> bytes:
    body = struct.pack("=i", error) + struct.pack("=IHHII", 36, 0x302, 5, seq, 0)
    return struct.pack("=IHHII", 16 + len(body), nl.NLMSG_ERROR, 0, seq, 0) + body


class TestMessages:
    def test_bind_and_unbind_are_acknowledged_config_commands(self) -> None:
        for command in (nl.NFQNL_CFG_CMD_BIND, nl.NFQNL_CFG_CMD_UNBIND):
            [(kind, flags, queue, attrs)] = decode(nl.config_command(7101, command, seq=9))
            assert kind == 0x302 and flags == nl.NLM_F_REQUEST | nl.NLM_F_ACK and queue == 7101
            assert attrs == {nl.NFQA_CFG_CMD: bytes([command, 0, 0, 0])}

    def test_queue_config_copies_whole_packets_with_flags_under_mask(self) -> None:
        [(kind, flags, queue, attrs)] = decode(nl.config_queue(7100, 4096, nl.NFQA_CFG_F_GSO, 7))
        assert kind == 0x302 and flags & nl.NLM_F_ACK and queue == 7100
        assert attrs[nl.NFQA_CFG_PARAMS] == struct.pack("!IB", 0xFFFF - 4, 2)  # copy range, NFQNL_COPY_PACKET
        assert attrs[nl.NFQA_CFG_QUEUE_MAXLEN] == struct.pack("!I", 4096)
        assert attrs[nl.NFQA_CFG_FLAGS] == struct.pack("!I", 4) and attrs[nl.NFQA_CFG_MASK] == struct.pack("!I", 7)

    def test_verdict_with_mark_and_payload(self) -> None:
        payload = bytes(range(7))  # odd length: the message is padded
        [(kind, flags, queue, attrs)] = decode(nl.verdict(7100, 0xABCDEF01, nl.NF_ACCEPT, 0x7463, payload))
        assert kind == 0x301 and flags == nl.NLM_F_REQUEST and queue == 7100
        assert attrs[nl.NFQA_VERDICT_HDR] == struct.pack("!II", 1, 0xABCDEF01)
        assert attrs[nl.NFQA_MARK] == struct.pack("!I", 0x7463)
        assert attrs[nl.NFQA_PAYLOAD] == payload

    def test_plain_drop_and_batch_accept(self) -> None:
        [(kind, _, _, attrs)] = decode(nl.verdict(7100, 5, nl.NF_DROP))
        assert kind == 0x301 and attrs == {nl.NFQA_VERDICT_HDR: struct.pack("!II", 0, 5)}
        [(kind, _, queue, attrs)] = decode(nl.verdict_batch(7101, 99, nl.NF_ACCEPT))
        assert kind == 0x303 and queue == 7101 and attrs == {nl.NFQA_VERDICT_HDR: struct.pack("!II", 1, 99)}

    def test_verdicts_of_two_queues_keep_their_own_numbers_with_and_without_a_mark(self) -> None:
        # The fixed part of a verdict is made once per queue and kind: each queue keeps its own.
        for queue in (7100, 7101, 7100):
            [(kind, _, number, attrs)] = decode(nl.verdict(queue, 8, nl.NF_ACCEPT, 0x10000))
            assert (kind, number) == (0x301, queue)
            assert attrs == {nl.NFQA_VERDICT_HDR: struct.pack("!II", 1, 8), nl.NFQA_MARK: struct.pack("!I", 0x10000)}
            [(kind, _, number, attrs)] = decode(nl.verdict(queue, 9, nl.NF_DROP, None, b"abcde"))
            assert (kind, number) == (0x301, queue)
            assert attrs == {nl.NFQA_VERDICT_HDR: struct.pack("!II", 0, 9), nl.NFQA_PAYLOAD: b"abcde"}
            [(kind, _, number, _)] = decode(nl.verdict_batch(queue, 10, nl.NF_ACCEPT))
            assert (kind, number) == (0x303, queue)


class TestParse:
    def test_packet_fields_and_flags(self) -> None:
        data = kernel_packet(42, IP_PACKET, skb_info=nl.NFQA_SKB_GSO | nl.NFQA_SKB_CSUMNOTREADY, mark=3)
        [packet] = nl.parse(data)
        assert isinstance(packet, nl.QueuedPacket)
        assert (packet.queue_num, packet.packet_id, packet.hw_protocol, packet.hook) == (7100, 42, 0x0800, 3)
        assert packet.payload == IP_PACKET and packet.cap_len == len(IP_PACKET)
        assert packet.gso and packet.csum_not_ready and packet.mark == 3 and packet.outdev == 2

    def test_without_skb_info_no_flags_and_a_cut_copy_keeps_the_real_length(self) -> None:
        [packet] = nl.parse(kernel_packet(1, IP_PACKET[:20], cap_len=40))
        assert isinstance(packet, nl.QueuedPacket)
        assert not packet.gso and not packet.csum_not_ready
        assert len(packet.payload) == 20 and packet.cap_len == 40

    def test_several_messages_and_acks_in_one_datagram(self) -> None:
        items = nl.parse(kernel_packet(1, IP_PACKET) + ack(7) + ack(8, -errno.ENOENT) + kernel_packet(2, b"\x45"))
        assert [type(item).__name__ for item in items] == ["QueuedPacket", "Ack", "Ack", "QueuedPacket"]
        assert items[1] == nl.Ack(0, 7) and items[2] == nl.Ack(errno.ENOENT, 8)

    def test_only_the_first_end_bytes_count(self) -> None:
        data = bytearray(kernel_packet(1, IP_PACKET)) + bytearray(100)
        assert len(nl.parse(data, len(data) - 100)) == 1
        assert nl.parse(data, 30) == []

    def test_malformed_messages_end_the_datagram(self) -> None:
        good = kernel_packet(1, IP_PACKET)
        bad_attr = bytearray(kernel_packet(2, IP_PACKET))
        struct.pack_into("=H", bad_attr, 20, 2)  # attribute length below its header
        assert nl.parse(good + bytes(bad_attr)) == nl.parse(good)
        no_header = nl.message(nl.NFQNL_MSG_PACKET, 7100, nl.attr(nl.NFQA_PAYLOAD, IP_PACKET), flags=0)
        assert nl.parse(no_header) == []
        long_claim = bytearray(good)
        struct.pack_into("=I", long_claim, 0, len(good) + 4)
        assert nl.parse(bytes(long_claim)) == []

    def test_single_packet_reads_the_usual_datagram_as_parse_does(self) -> None:
        data = kernel_packet(42, IP_PACKET, skb_info=nl.NFQA_SKB_GSO, cap_len=9000, mark=3)
        assert one(data) == (42, IP_PACKET, 9000, nl.NFQA_SKB_GSO, 3)
        data = kernel_packet(7, IP_PACKET)
        assert one(data) == (7, IP_PACKET, len(IP_PACKET), 0, 0)
        # anything else is left to parse: two messages, an acknowledgement, a payload not last
        two = kernel_packet(1, IP_PACKET) + kernel_packet(2, IP_PACKET)
        assert one(two) is None
        assert one(ack(7)) is None
        attrs = (nl.attr(nl.NFQA_PACKET_HDR, struct.pack("!IHBx", 3, 0x0800, 3)) + nl.attr(nl.NFQA_PAYLOAD, IP_PACKET)
                 + nl.attr(nl.NFQA_MARK, struct.pack("!I", 5)))  # fmt: skip
        odd = nl.message(nl.NFQNL_MSG_PACKET, 7100, attrs, flags=0)
        assert one(odd) is None and nl.parse(odd)[0].mark == 5  # type: ignore[union-attr]
        headers = [nl.attr(nl.NFQA_PACKET_HDR, struct.pack("!IHBx", i, 0x0800, 3)) for i in (3, 4)]
        twice = nl.message(nl.NFQNL_MSG_PACKET, 7100, b"".join(headers) + nl.attr(nl.NFQA_PAYLOAD, IP_PACKET), flags=0)
        assert one(twice) is None
        assert nl.parse(twice)[0].packet_id == 4  # type: ignore[union-attr]  # parse takes the last header

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=200), st.integers(min_value=0, max_value=399), st.integers(min_value=0, max_value=3))
    def test_single_packet_never_disagrees_with_parse(self, noise: bytes, cut: int, tail: int) -> None:
        """Mutated and cut datagrams: single_packet gives what parse gives for one packet, or None."""
        data = bytearray(kernel_packet(5, IP_PACKET, skb_info=nl.NFQA_SKB_CSUMNOTREADY, mark=1))
        data[cut % len(data) :] = noise
        data += bytes(tail)
        fields = one(bytes(data))
        if fields is not None:
            [item] = nl.parse(bytes(data))
            assert isinstance(item, nl.QueuedPacket)
            assert fields == (item.packet_id, item.payload, item.cap_len, item.skb_info, item.mark)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=400), st.integers(min_value=0, max_value=399))
    def test_any_bytes_parse_without_an_exception(self, noise: bytes, cut: int) -> None:
        data = bytearray(kernel_packet(5, IP_PACKET))
        data[cut % len(data) :] = noise
        for item in nl.parse(bytes(data)):
            assert isinstance(item, nl.QueuedPacket | nl.Ack)


class FakeSocket:
    """recv_into from queued datagrams (an OSError instance is raised instead), sendmsg recorded;
    a request (send) is acknowledged by the next recv, as the kernel does."""

    def __init__(self) -> None:
        self.incoming: list[bytes | OSError] = []
        self.sent: list[bytes] = []
        self.requests: list[bytes] = []
        self.closed = False

    def send(self, data: bytes) -> int:
        self.requests.append(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        return ack(struct.unpack_from("=IHHII", self.requests[-1])[3])

    def settimeout(self, timeout: float | None) -> None:
        pass

    def setblocking(self, flag: bool) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def recv_into(self, buffer: bytearray) -> int:
        if not self.incoming:
            raise BlockingIOError
        item = self.incoming.pop(0)
        if isinstance(item, OSError):
            raise item
        buffer[: len(item)] = item
        return len(item)

    def sendmsg(self, parts: list[bytes]) -> int:
        self.sent.append(b"".join(parts))
        return len(self.sent[-1])

    def fileno(self) -> int:
        return -1


class PairSocket:
    """The C path's socket: one end of a datagram socketpair, a real fd that FastQueue reads and
    writes through _fastio. Datagrams assigned to `incoming` are written to the other end at once;
    `sent` reads back what FastQueue sent."""

    def __init__(self) -> None:
        self.ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.ours.setblocking(False)
        self.peer.setblocking(False)
        self._sent: list[bytes] = []

    @property
    def incoming(self) -> list[bytes]:
        return []

    @incoming.setter
    def incoming(self, datagrams: list[bytes]) -> None:
        for datagram in datagrams:
            self.peer.send(datagram)

    @property
    def sent(self) -> list[bytes]:
        try:
            while True:
                self._sent.append(self.peer.recv(0x20000))
        except BlockingIOError:
            return self._sent

    def close(self) -> None:
        self.ours.close()
        self.peer.close()


PAIRS: list[PairSocket] = []
"""The socketpairs of the test running (closed after it)."""


@pytest.fixture(autouse=True)
def _close_pairs() -> Any:
    yield
    while PAIRS:
        PAIRS.pop().close()


native_only = pytest.mark.skipif(not fastqueue.NATIVE, reason="a pure build has no C module (_fastio)")
PATHS = [pytest.param(False, id="python"), pytest.param(True, id="native", marks=native_only)]
"""The two ways FastQueue reads and sends: in Python (fake socket) and through _fastio (socketpair)."""


class LoggingSocket(FakeSocket):
    """A FakeSocket that logs its system calls in order."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def recv_into(self, buffer: bytearray) -> int:
        self.log.append("recv" if self.incoming else "recv EAGAIN")
        return super().recv_into(buffer)

    def sendmsg(self, parts: list[bytes]) -> int:
        self.log.append("sendmsg")
        return super().sendmsg(parts)


def fake_queue(callback: Callable[[Any], None], flags: int = 0, native: bool = False) -> tuple[FastQueue, Any]:
    """A FastQueue bound on a FakeSocket (the Python path), or with `native` on a PairSocket (the C
    path: bind() takes it for a real socket in a compiled build); and that socket."""
    if not native:
        sock = FakeSocket()
        queue = FastQueue(flags, connect=lambda queue_num, max_len, sock_len: sock)
        queue.bind(7100, callback)
        assert not queue._native
        return queue, sock
    pair = PairSocket()
    PAIRS.append(pair)
    queue = FastQueue(flags, connect=lambda queue_num, max_len, sock_len: pair.ours)
    queue.bind(7100, callback)
    assert queue._native
    return queue, pair


def verdicts(sock: FakeSocket) -> list[tuple[str, int, int, bytes | None]]:
    """(batch|one, verdict, id, payload) of every verdict sent, in order."""
    out = []
    for datagram in sock.sent:
        for kind, _, _, attrs in decode(datagram):
            action, packet_id = struct.unpack("!II", attrs[nl.NFQA_VERDICT_HDR])
            out.append(("batch" if kind == 0x303 else "one", action, packet_id, attrs.get(nl.NFQA_PAYLOAD)))
    return out


class TestFastQueue:
    @pytest.fixture(autouse=True)
    def _still_clock(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Verdicts are also held by time (HOLD_SECONDS, 100 us): on a loaded machine the real clock
        would split the batches these tests count, so it stands still unless a test moves it."""
        from nfq_tcpcrypt.shell import fastqueue

        monkeypatch.setattr(fastqueue.time, "monotonic", lambda: 100.0)

    @pytest.mark.parametrize("native", PATHS)
    def test_the_first_verdict_goes_alone_then_plain_accepts_become_one_batch_verdict(self, native: bool) -> None:
        seen: list[int] = []
        queue, sock = fake_queue(lambda pkt: (seen.append(pkt.id), pkt.accept()), native=native)
        sock.incoming = [kernel_packet(i, IP_PACKET) for i in range(10, 20)]
        queue.run(block=False)
        assert seen == list(range(10, 20))
        assert verdicts(sock) == [("one", 1, 10, None), ("batch", 1, 19, None)] and len(sock.sent) == 2
        assert queue.counters["recv_calls"] == 10 and queue.counters["verdict_sends"] == 2

    def test_a_lone_packet_s_verdict_goes_before_the_recv_that_finds_the_socket_empty(self) -> None:
        log: list[str] = []
        sock = LoggingSocket(log)
        queue = FastQueue(connect=lambda queue_num, max_len, sock_len: sock)
        queue.bind(7100, lambda pkt: (log.append("callback"), pkt.accept()))
        sock.incoming = [kernel_packet(1, IP_PACKET)]
        queue.run(block=False)
        assert log == ["recv", "callback", "sendmsg", "recv EAGAIN"]
        # with more waiting behind it, the first verdict still goes at once; the rest are batched
        log.clear()
        sock.incoming = [kernel_packet(i, IP_PACKET) for i in (2, 3, 4)]
        queue.run(block=False)
        assert log == ["recv", "callback", "sendmsg", "recv", "callback", "recv", "callback", "recv EAGAIN",
                       "sendmsg"]  # fmt: skip
        assert verdicts(sock) == [("one", 1, 1, None), ("one", 1, 2, None), ("batch", 1, 4, None)]

    @pytest.mark.parametrize("native", PATHS)
    def test_verdicts_wait_for_at_most_hold_max_packets(self, native: bool) -> None:
        from nfq_tcpcrypt.shell.fastqueue import HOLD_MAX

        queue, sock = fake_queue(lambda pkt: pkt.accept(), native=native)
        queue.hold_seconds = 3600.0  # only the count bounds the hold here
        sock.incoming = [kernel_packet(i, IP_PACKET) for i in range(1, 2 * HOLD_MAX + 6)]
        queue.run(block=False)
        # the first alone, then HOLD_MAX at a time
        assert verdicts(sock) == [("one", 1, 1, None), ("batch", 1, HOLD_MAX + 1, None),
                                  ("batch", 1, 2 * HOLD_MAX + 1, None),
                                  ("batch", 1, 2 * HOLD_MAX + 5, None)]  # fmt: skip

    @pytest.mark.parametrize("native", PATHS)
    def test_verdicts_wait_for_at_most_hold_seconds(self, native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        """Packets that take long to handle (the engine) do not hold each other's verdicts: once the
        oldest held verdict is HOLD_SECONDS old, the verdicts go out at the next one."""
        from nfq_tcpcrypt.shell import fastqueue

        clock = [100.0]
        monkeypatch.setattr(fastqueue.time, "monotonic", lambda: clock[0])

        def slow(pkt: FastPacket) -> None:
            clock[0] += fastqueue.HOLD_SECONDS * 0.4  # each packet's handling: 0.4 of the hold
            pkt.accept()

        queue, sock = fake_queue(slow, native=native)
        sock.incoming = [kernel_packet(i, IP_PACKET) for i in range(1, 8)]
        queue.run(block=False)
        # 1 alone; held since the verdict of 2: at 4 (0.8 of the hold) still held, at 5 (1.2) sent;
        # then 6 and 7
        assert verdicts(sock) == [("one", 1, 1, None), ("batch", 1, 5, None), ("batch", 1, 7, None)]
        assert len(sock.sent) == 3

    @pytest.mark.parametrize("native", PATHS)
    def test_verdicts_keep_the_packets_order(self, native: bool) -> None:
        """A run of plain accepts is closed by a batch verdict before a drop or a mangled packet."""

        def handle(pkt: FastPacket) -> None:
            if pkt.id == 3:
                pkt.drop()
            elif pkt.id == 5:
                pkt.set_payload(b"new")
                pkt.accept()
            else:
                pkt.accept()

        queue, sock = fake_queue(handle, native=native)
        sock.incoming = [kernel_packet(i, IP_PACKET) for i in range(1, 8)]
        queue.run(block=False)
        assert verdicts(sock) == [
            ("one", 1, 1, None), ("batch", 1, 2, None), ("one", 0, 3, None), ("batch", 1, 4, None),
            ("one", 1, 5, b"new"), ("batch", 1, 7, None),
        ]  # fmt: skip
        assert len(sock.sent) == 2  # the first alone, the rest together

    @pytest.mark.parametrize("native", PATHS)
    def test_a_marked_accept_is_its_own_verdict(self, native: bool) -> None:
        def handle(pkt: FastPacket) -> None:
            pkt.set_mark(9)
            pkt.accept()

        queue, sock = fake_queue(handle, native=native)
        sock.incoming = [kernel_packet(1, IP_PACKET)]
        queue.run(block=False)
        [(kind, _, _, attrs)] = decode(sock.sent[0])
        assert kind == 0x301 and attrs[nl.NFQA_MARK] == struct.pack("!I", 9)

    @pytest.mark.parametrize("native", PATHS)
    def test_a_callback_exception_still_sends_every_verdict_and_propagates(self, native: bool) -> None:
        def handle(pkt: FastPacket) -> None:
            if pkt.id == 2:
                raise RuntimeError("engine bug")  # no verdict given: the queue drops the packet
            pkt.accept()

        queue, sock = fake_queue(handle, native=native)
        sock.incoming = [kernel_packet(i, IP_PACKET) for i in (1, 2, 3)]
        with pytest.raises(RuntimeError):
            queue.run(block=False)
        assert verdicts(sock) == [("one", 1, 1, None), ("one", 0, 2, None)]
        queue.run(block=False)  # the next drain takes the packet left in the socket
        assert verdicts(sock)[-1] == ("one", 1, 3, None)  # the next drain's first

    @pytest.mark.parametrize("native", PATHS)
    def test_every_packet_of_a_datagram_gets_its_verdict_before_an_exception_propagates(self, native: bool) -> None:
        def handle(pkt: FastPacket) -> None:
            if pkt.id == 1:
                raise RuntimeError("engine bug")
            pkt.accept()

        queue, sock = fake_queue(handle, native=native)
        sock.incoming = [kernel_packet(1, IP_PACKET) + kernel_packet(2, IP_PACKET) + kernel_packet(3, IP_PACKET)]
        with pytest.raises(RuntimeError):
            queue.run(block=False)
        assert verdicts(sock) == [("one", 0, 1, None), ("batch", 1, 3, None)]

    @pytest.mark.parametrize("native", PATHS)
    def test_a_second_verdict_is_refused(self, native: bool) -> None:
        def handle(pkt: FastPacket) -> None:
            pkt.accept()
            with pytest.raises(RuntimeError):
                pkt.drop()

        queue, sock = fake_queue(handle, native=native)
        sock.incoming = [kernel_packet(1, IP_PACKET)]
        queue.run(block=False)
        assert verdicts(sock) == [("one", 1, 1, None)]

    def test_enobufs_is_counted_and_refused_verdicts_are_counted(self) -> None:
        queue, sock = fake_queue(lambda pkt: pkt.accept())
        sock.incoming = [OSError(errno.ENOBUFS, "no buffer space"), ack(0, -errno.ENOENT), kernel_packet(1, IP_PACKET)]
        queue.run(block=False)
        assert queue.counters["enobufs"] == 1 and queue.counters["verdict_errors"] == 1
        assert verdicts(sock) == [("one", 1, 1, None)]

    def test_other_socket_errors_propagate(self) -> None:
        queue, sock = fake_queue(lambda pkt: pkt.accept())
        sock.incoming = [OSError(errno.EBADF, "bad fd")]
        with pytest.raises(OSError):
            queue.run(block=False)

    def test_a_packet_larger_than_a_verdict_holds_is_refused(self) -> None:
        """A netlink attribute's 16-bit length includes its 4-byte header: 65,531 bytes at most."""
        queue, sock = fake_queue(lambda pkt: pkt.accept())
        packet = FastPacket.of(queue, nl.parse(kernel_packet(1, IP_PACKET))[0])  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            packet.set_payload(bytes(65532))
        packet.set_payload(bytes(65531))
        packet.accept()
        queue.flush()
        assert verdicts(sock) == [("one", 1, 1, bytes(65531))]
        assert nl.COPY_RANGE == 65531

    def test_verdicts_beyond_the_chunk_size_take_more_sendmsg_calls(self) -> None:
        def handle(pkt: FastPacket) -> None:
            pkt.set_payload(bytes(60000))
            pkt.accept()

        queue, sock = fake_queue(handle)
        sock.incoming = [kernel_packet(i, IP_PACKET) for i in range(1, 6)]
        queue.run(block=False)
        assert [v[2] for v in verdicts(sock)] == [1, 2, 3, 4, 5] and 2 <= len(sock.sent) <= 3

    def test_the_chunk_size_splits_verdicts_held_together(self) -> None:
        queue, sock = fake_queue(lambda pkt: pkt.accept())
        for i in range(1, 6):
            packet = FastPacket.of(queue, nl.parse(kernel_packet(i, IP_PACKET))[0])  # type: ignore[arg-type]
            packet.set_payload(bytes(60000))
            queue._pending.append(packet)
            packet._verdict = nl.NF_ACCEPT
        queue.flush()
        assert [v[2] for v in verdicts(sock)] == [1, 2, 3, 4, 5] and len(sock.sent) == 2  # 180 KB, then 120 KB

    def test_blocking_run_is_refused(self) -> None:
        queue, _ = fake_queue(lambda pkt: pkt.accept())
        with pytest.raises(ValueError):
            queue.run(block=True)

    def test_factory_flags(self) -> None:
        assert factory(True, False)().flags == nl.NFQA_CFG_F_FAIL_OPEN
        assert factory(False, True)().flags == nl.NFQA_CFG_F_GSO
        with pytest.raises(ValueError):
            queue_factory("netfilterqueue", gso=True)
        with pytest.raises(ValueError):
            queue_factory("nope")


@native_only
class TestNative:
    """_fastio.c reads and writes the same bytes as the Python path (nfnetlink.py), on a real fd."""

    def python_reading(self, datagram: bytes) -> Any:
        sock = FakeSocket()
        sock.incoming = [datagram]
        return FastQueue()._receive(sock)

    def native_reading(self, datagram: bytes) -> Any:
        pair = PairSocket()
        PAIRS.append(pair)
        pair.incoming = [datagram]
        from nfq_tcpcrypt.shell import _fastio

        got = _fastio.recv_packet(pair.ours.fileno())
        assert _fastio.recv_packet(pair.ours.fileno()) is None  # empty now: None, no exception
        return got

    def test_the_usual_datagram_and_the_others(self) -> None:
        usual = kernel_packet(42, IP_PACKET, skb_info=nl.NFQA_SKB_GSO, cap_len=9000, mark=3)
        assert self.native_reading(usual) == (42, IP_PACKET, 9000, nl.NFQA_SKB_GSO, 3) == self.python_reading(usual)
        for other in (kernel_packet(1, IP_PACKET) + kernel_packet(2, IP_PACKET), ack(7), b"", b"\x01" * 31):
            assert self.native_reading(other) == other == self.python_reading(other)
        big = kernel_packet(9, bytes(range(256)) * 255 + bytes(251))  # the largest copy: 65,531 bytes
        assert self.native_reading(big) == self.python_reading(big) == (9, bytes(range(256)) * 255 + bytes(251),
                                                                        65531, 0, 0)  # fmt: skip

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=200), st.integers(min_value=0, max_value=399), st.integers(min_value=0, max_value=3))
    def test_any_datagram_reads_the_same(self, noise: bytes, cut: int, tail: int) -> None:
        """Mutated and cut datagrams: the same packet fields, or the same bytes for parse."""
        data = bytearray(kernel_packet(5, IP_PACKET, skb_info=nl.NFQA_SKB_CSUMNOTREADY, cap_len=70, mark=1))
        data[cut % len(data) :] = noise
        data += bytes(tail)
        assert self.native_reading(bytes(data)) == self.python_reading(bytes(data))

    @settings(max_examples=300, deadline=None)
    @given(st.integers(min_value=0, max_value=0xFFFF), st.integers(min_value=0, max_value=0xFFFFFFFF),
           st.sampled_from([nl.NF_ACCEPT, nl.NF_DROP]), st.none() | st.integers(min_value=0, max_value=0xFFFFFFFF),
           st.none() | st.binary(max_size=300))  # fmt: skip
    def test_a_verdict_is_the_same_message(self, queue: int, packet_id: int, action: int, mark: int | None,
                                           payload: bytes | None) -> None:  # fmt: skip
        from nfq_tcpcrypt.shell import _fastio

        pair = PairSocket()
        PAIRS.append(pair)
        _fastio.send_verdict(pair.ours.fileno(), queue, packet_id, action, mark, payload)
        assert pair.sent == [nl.verdict(queue, packet_id, action, mark, payload)]

    def test_refusals(self) -> None:
        from nfq_tcpcrypt.shell import _fastio

        pair = PairSocket()
        PAIRS.append(pair)
        fd = pair.ours.fileno()
        _fastio.send_verdict(fd, 7100, 1, nl.NF_ACCEPT, None, bytes(65531))  # the largest a verdict holds
        with pytest.raises(ValueError):
            _fastio.send_verdict(fd, 7100, 1, nl.NF_ACCEPT, None, bytes(65532))
        with pytest.raises(ValueError):
            _fastio.send_verdict(fd, 0x10000, 1, nl.NF_ACCEPT, None, None)
        with pytest.raises((ValueError, OverflowError)):
            _fastio.send_verdict(fd, 7100, 1, nl.NF_ACCEPT, 1 << 32, None)
        with pytest.raises(TypeError):
            _fastio.send_verdict(fd, 7100, 1, nl.NF_ACCEPT, None, "text")
        with pytest.raises(ValueError):
            _fastio.recv_packet(-1)
        assert len(pair.sent) == 1  # nothing else went
        pair.close()
        with pytest.raises(OSError) as refused:
            _fastio.recv_packet(fd)
        assert refused.value.errno == errno.EBADF

    def test_a_compiled_build_binds_the_kernel_s_socket_to_the_c_path(self) -> None:
        import nfq_tcpcrypt

        assert nfq_tcpcrypt.build() == "compiled"  # a pure build has no _fastio (native_only)
        queue = FastQueue(connect=lambda queue_num, max_len, sock_len: PairSocket().ours)
        queue.bind(7100, lambda pkt: pkt.accept())
        assert queue._native
        queue._sock.close()  # type: ignore[union-attr]


class BoundFake:
    """A FastQueue whose bind connects a FakeSocket, for QueuePair (`queue`), and that socket (`sock`)."""

    def __init__(self) -> None:
        self.sock = FakeSocket()
        self.queue = FastQueue(connect=lambda queue_num, max_len, sock_len: self.sock)


def test_packet_info_trusts_only_what_the_kernel_vouches_for() -> None:
    # on an inbound hook: NOTVERIFIED means the kernel did not check the checksum, so the engine must
    assert packet_info(nl.NFQA_SKB_CSUM_NOTVERIFIED) == PacketInfo(gso=False, checksum_trusted=False)
    assert packet_info(nl.NFQA_SKB_CSUM_NOTVERIFIED | nl.NFQA_SKB_GSO) == PacketInfo(gso=True, checksum_trusted=False)
    # not ready (made here, or forwarded with the checksum left to the kernel), or verified: trusted
    assert packet_info(nl.NFQA_SKB_CSUMNOTREADY | nl.NFQA_SKB_GSO) == PacketInfo(gso=True, checksum_trusted=True)
    assert packet_info(0) == PacketInfo(gso=False, checksum_trusted=True)


class TestQueuePairOnFastQueue:
    def test_info_reaches_the_handler_side_and_verdicts_flush_before_injection(self) -> None:
        made: list[BoundFake] = []
        log: list[object] = []
        infos: list[Any] = []
        engine_infos: list[PacketInfo] = []

        def make() -> FastQueue:
            made.append(BoundFake())
            return made[-1].queue

        def handler(payload: bytes, direction: Direction, encrypted: bool, info: PacketInfo) -> Verdict:
            infos.append(pair.info)
            engine_infos.append(info)
            return Verdict(Action.ACCEPT, payload + b"!") if len(infos) == 2 else Verdict(Action.ACCEPT)

        def after() -> None:  # what EventLoop._flush does when the engine has something to inject
            if len(infos) == 2:
                pair.flush_verdicts()
                log.append(("inject", len(made[0].sock.sent)))

        pair = QueuePair(7100, handler, {}, after, make)
        inbound = made[0]
        inbound.sock.incoming = [kernel_packet(i, IP_PACKET, skb_info=nl.NFQA_SKB_GSO if i == 1 else 0)
                                 for i in (1, 2, 3)]  # fmt: skip
        pair.drain(Direction.INBOUND)
        assert infos[0].gso and not infos[1].gso
        assert engine_infos[0] == PacketInfo(gso=True, checksum_trusted=True) and not engine_infos[1].gso
        # packet 1 went alone (the drain's first), packet 2 before the injection, 3 with the drain's end
        assert log == [("inject", 2)]
        assert verdicts(inbound.sock) == [("one", 1, 1, None), ("one", 1, 2, IP_PACKET + b"!"),
                                          ("batch", 1, 3, None)]  # fmt: skip
        assert pair.backend_counters()["recv_calls"] == 3
        pair.close()
        # unbound through the socket: an acknowledged NFQNL_CFG_CMD_UNBIND, then closed
        (_, _, queue, attrs), = decode(inbound.sock.requests[-1])
        assert queue == 7100 and attrs[nl.NFQA_CFG_CMD][0] == nl.NFQNL_CFG_CMD_UNBIND and inbound.sock.closed

    def test_the_drain_s_first_verdict_is_out_before_the_work_after_its_packet(self) -> None:
        """What the loop does after a packet (its injections the same way, its events) comes after
        the verdict of a drain's first packet, as on NetfilterQueue; later packets' are held."""
        made: list[BoundFake] = []
        seen: list[int] = []

        def make() -> FastQueue:
            made.append(BoundFake())
            return made[-1].queue

        pair = QueuePair(7100, lambda *args: Verdict(Action.ACCEPT), {},
                         lambda: seen.append(len(made[0].sock.sent)), make)  # fmt: skip
        made[0].sock.incoming = [kernel_packet(i, IP_PACKET) for i in (1, 2, 3)]
        pair.drain(Direction.INBOUND)
        assert seen == [1, 1, 1]
        assert verdicts(made[0].sock) == [("one", 1, 1, None), ("batch", 1, 3, None)]
        pair.close()

    def test_event_loop_sends_held_verdicts_before_it_injects(self) -> None:
        from nfq_tcpcrypt.shell.loop import EventLoop, SignalWatch

        order: list[str] = []

        class Engine:
            counters: dict[str, int] = {}
            pending: list[Injection] = []

            def process(self, packet: bytes, direction: Direction, now: float, encrypted: bool = False,
                        info: Any = None) -> Verdict:
                self.pending = [Injection(b"ack", Direction.INBOUND)]
                return Verdict(Action.ACCEPT)

            def segments_to_inject(self) -> list[Injection]:
                out, self.pending = self.pending, []
                return out

            def next_event(self) -> None:
                return None

        class Injector:
            sent = sent_local = failed = 0

            def send(self, packet: bytes, direction: Direction = Direction.OUTBOUND) -> bool:
                order.append(f"inject after {len(made[0].sock.sent)} verdict datagram(s)")
                return True

        made: list[BoundFake] = []

        def make() -> FastQueue:
            made.append(BoundFake())
            return made[-1].queue

        signals = SignalWatch()
        try:
            loop = EventLoop(Engine(), 7100, Injector(), signals, None, make)  # type: ignore[arg-type]
            made[0].sock.incoming = [kernel_packet(1, IP_PACKET)]
            loop.queues.drain(Direction.INBOUND)
            assert order == ["inject after 1 verdict datagram(s)"]
            loop.close()
        finally:
            signals.close()


class TestOptions:
    def test_backend_and_gso_options(self) -> None:
        from nfq_tcpcrypt.core.errors import ConfigError
        from nfq_tcpcrypt.shell.settings import gso_enabled, options_from, parse_file_text

        assert options_from({}, {}).queue_backend == "fast"
        assert options_from(parse_file_text('queue-backend = "netfilterqueue"'), {}).queue_backend == "netfilterqueue"
        fast = options_from(parse_file_text('queue-backend = "fast"'), {})
        assert fast.queue_backend == "fast" and gso_enabled(fast)  # the engine frames super-packets
        assert gso_enabled(options_from({}, {}))  # the default backend is fast
        assert not gso_enabled(options_from(parse_file_text('queue-backend = "netfilterqueue"'), {}))
        assert not gso_enabled(options_from({}, {"queue_backend": "fast", "queue_gso": False}))
        assert gso_enabled(options_from({}, {"queue_backend": "fast", "pass_through": True}))
        assert not gso_enabled(options_from({}, {"queue_backend": "fast", "pass_through": True, "queue_gso": False}))
        with pytest.raises(ConfigError, match="unknown queue-backend"):
            options_from({}, {"queue_backend": "libnfq"})
        with pytest.raises(ConfigError, match="needs queue-backend fast"):
            options_from({}, {"queue_backend": "netfilterqueue", "queue_gso": True, "pass_through": True})
        assert gso_enabled(options_from({}, {"queue_backend": "fast", "queue_gso": True}))
        # a full queue that accepts unqueued would put an encrypted connection's plaintext on the wire
        with pytest.raises(ConfigError, match="plaintext onto the wire"):
            options_from({}, {"queue_backend": "fast", "queue_fail_open": True})
        with pytest.raises(ConfigError, match="needs queue-backend fast"):
            options_from({}, {"queue_backend": "netfilterqueue", "queue_fail_open": True, "pass_through": True})
        allowed = options_from({}, {"queue_backend": "fast", "queue_fail_open": True, "pass_through": True})
        assert allowed.queue_fail_open

    def test_the_daemon_binds_without_fail_open_unless_asked(self) -> None:
        from nfq_tcpcrypt.shell.daemon import queue_binding
        from nfq_tcpcrypt.shell.settings import options_from

        assert queue_binding(options_from({}, {"queue_backend": "fast"}))().flags == nl.NFQA_CFG_F_GSO
        assert queue_binding(options_from({}, {"queue_backend": "fast", "queue_gso": False}))().flags == 0
        passing = options_from({}, {"queue_backend": "fast", "pass_through": True, "queue_fail_open": True})
        assert queue_binding(passing)().flags == nl.NFQA_CFG_F_FAIL_OPEN | nl.NFQA_CFG_F_GSO
