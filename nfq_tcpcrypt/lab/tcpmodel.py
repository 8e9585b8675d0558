"""A small TCP endpoint model and a two-engine harness over an in-memory wire.

The model is just enough TCP to drive the engines: handshake with MSS/SACK-permitted/timestamps/
window scale, cumulative ACKs, segments of the MSS less their options, SACK blocks for held data,
retransmission, FIN and RST. The harness's wire is lossless unless a Channel is given; every wire
segment must fit the MSS of both ends.

With `gso` the endpoints send super-packets as Linux does with GSO (several segments' payload in
one packet) and the harness hands them to the engines as such (`PacketInfo`); after the verdict it
segments them as the kernel would, at the stack's own segment size with the verdict's options in
every segment, and checks each segment on the wire. With `gro` it merges in-order wire segments
into one packet before the receiving engine, as GRO does (docs/architecture.md: Sizes).
"""

from __future__ import annotations

import hashlib
import struct
from collections import deque
from collections.abc import Callable

from nfq_tcpcrypt.core.config import Configuration
from nfq_tcpcrypt.core.constants import TCP_ACK, TCP_FIN, TCP_PSH, TCP_SYN
from nfq_tcpcrypt.core.engine import Engine
from nfq_tcpcrypt.core.flow import Direction
from nfq_tcpcrypt.core.verdict import UNKNOWN, Action, PacketInfo, Verdict
from nfq_tcpcrypt.core.wire.tcp import new_segment, parse_options, parse_segment, serialize_segment

GSO_INFO = PacketInfo(gso=True, checksum_trusted=True)
SUPER_PACKET_MAX = 0xFFFF - 4

A_IP = bytes([10, 77, 0, 1])
B_IP = bytes([10, 77, 0, 2])
MASK = 0xFFFFFFFF


class SeededRandom:
    """Deterministic bytes from SHAKE-256 of a seed."""

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._counter = 0

    def __call__(self, n: int) -> bytes:
        self._counter += 1
        return hashlib.shake_256(self._seed + self._counter.to_bytes(8, "big")).digest(n)


class SeededKeyFactory:
    """Private keys built from a seeded stream, so equal seeds give equal transcripts (a core.kex.KeyFactory)."""

    def __init__(self, random: SeededRandom) -> None:
        self._random = random

    def generate(self, tep):  # type: ignore[no-untyped-def]
        from cryptography.hazmat.primitives.asymmetric import ec, x448, x25519

        from nfq_tcpcrypt.core.constants import Tep

        if tep == Tep.X25519:
            return x25519.X25519PrivateKey.from_private_bytes(self._random(32))
        if tep == Tep.X448:
            return x448.X448PrivateKey.from_private_bytes(self._random(56))
        curve = ec.SECP256R1() if tep == Tep.P256 else ec.SECP521R1()
        return ec.derive_private_key(int.from_bytes(self._random(80), "big") % (2**250) + 1, curve)


def seeded_config(seed: bytes, **kwargs) -> Configuration:  # type: ignore[no-untyped-def]
    random = SeededRandom(seed)
    return Configuration(random_bytes=random, key_factory=SeededKeyFactory(SeededRandom(seed + b"k")), **kwargs)


class Endpoint:
    """One TCP endpoint (the "local stack" behind an engine).

    Enough TCP for the engines: handshake (MSS, SACK-permitted, timestamps, window scale), a 64 KiB
    send window, cumulative ACKs, out-of-order reassembly, retransmission on timeout (go-back-N)
    and fast retransmit on three duplicate ACKs, FIN, RST, keepalive answers.
    """

    RTO = 0.2
    WINDOW = 65536

    def __init__(self, ip: bytes, port: int, isn: int, mss: int = 1460, gso: int = 1) -> None:
        self.ip, self.port, self.isn, self.mss = ip, port, isn, mss
        self.gso = gso  # segments per packet sent (GSO); 1: one segment per packet
        self.gso_size: dict[bytes, int] = {}  # super-packets sent -> their segment size
        self.peer_ip = b""
        self.peer_port = 0
        self.state = "closed"
        self.stream = bytearray()  # everything written, from offset 0 = isn+1
        self.una = 0  # offsets of snd_una / snd_nxt from isn+1
        self.nxt = 0
        self.fin_written = False
        self.irs = 0
        self.received = bytearray()
        self.ooo: dict[int, bytes] = {}
        self.peer_fin_at: int | None = None
        self.peer_fin = False
        self.was_reset = False
        self.out: list[bytes] = []
        self.ts = 1000
        self.ts_recent = 0
        self.peer_mss = 536
        self.rto_at: float | None = None
        self.dupacks = 0
        self.now = 0.0
        self.sack_ok = False

    # -- helpers
    @property
    def rcv_nxt(self) -> int:
        return (self.irs + 1 + len(self.received) + self.peer_fin) & MASK

    def _options(self) -> bytes:
        """Timestamps, and SACK blocks (RFC 2018) for held out-of-order data, as Linux sends them."""
        options = struct.pack("!BBBBII", 1, 1, 8, 10, self.ts, self.ts_recent)
        if self.sack_ok and self.ooo:
            blocks: list[list[int]] = []
            for start in sorted(self.ooo):
                end = start + len(self.ooo[start])
                if blocks and start <= blocks[-1][1]:
                    blocks[-1][1] = max(blocks[-1][1], end)
                else:
                    blocks.append([start, end])
            base = self.irs + 1
            body = b"".join(struct.pack("!II", (base + lo) & MASK, (base + hi) & MASK) for lo, hi in blocks[:3])
            options += bytes((1, 1, 5, 2 + len(body))) + body
        return options

    def _payload_room(self) -> int:
        """The MSS less the options a data segment would carry now (RFC 6691), as Linux sizes it."""
        return min(self.mss, self.peer_mss) - len(self._options())

    def _emit(self, flags: int, payload: bytes = b"", options: bytes | None = None, seq: int | None = None) -> None:
        self.ts += 1
        if options is None:
            options = self._options()
        if seq is None:
            seq = self.isn + 1 + self.nxt
        seg = new_segment(
            self.ip, self.peer_ip, self.port, self.peer_port, seq & MASK,
            self.rcv_nxt if flags & TCP_ACK else 0, flags, 1000, options, payload,
        )
        self.out.append(serialize_segment(seg))

    def _syn_options(self) -> bytes:
        timestamps = struct.pack("!BBII", 8, 10, self.ts, self.ts_recent)
        return struct.pack("!BBH", 2, 4, self.mss) + b"\x04\x02" + timestamps + b"\x01\x03\x03\x07"

    def _send_syn(self) -> None:
        flags = TCP_SYN | (TCP_ACK if self.state == "syn-received" else 0)
        self._emit(flags, options=self._syn_options(), seq=self.isn)
        self.rto_at = self.now + self.RTO

    # -- user calls
    def connect(self, peer_ip: bytes, peer_port: int) -> None:
        self.peer_ip, self.peer_port = peer_ip, peer_port
        self.state = "syn-sent"
        self._send_syn()

    def listen(self) -> None:
        self.state = "listen"

    def write(self, data: bytes) -> None:
        self.stream += data
        self.pump()

    def close(self) -> None:
        self.fin_written = True
        self.pump()

    @property
    def done_sending(self) -> bool:
        return self.una >= len(self.stream) + self.fin_written

    def pump(self) -> None:
        if self.state not in ("established", "fin-sent"):
            return
        mss = self._payload_room()
        end = len(self.stream)
        while self.nxt < end and self.nxt - self.una < self.WINDOW:
            room = min(mss * self.gso, self.WINDOW - (self.nxt - self.una))
            chunk = bytes(self.stream[self.nxt : self.nxt + max(room, 1)])
            fin = self.fin_written and self.nxt + len(chunk) == end
            self._emit(TCP_ACK | TCP_PSH | (TCP_FIN if fin else 0), chunk)
            if len(chunk) > mss:
                self.gso_size[self.out[-1]] = mss
            self.nxt += len(chunk) + fin
        if self.fin_written and self.nxt == end:
            self._emit(TCP_ACK | TCP_FIN)
            self.nxt += 1
        if self.fin_written:
            self.state = "fin-sent"
        if self.nxt > self.una and self.rto_at is None:
            self.rto_at = self.now + self.RTO

    def on_timer(self, now: float) -> None:
        self.now = now
        if self.rto_at is None or now < self.rto_at:
            return
        self.rto_at = None
        if self.state in ("syn-sent", "syn-received"):
            self._send_syn()
        elif self.nxt > self.una:
            self.nxt = self.una  # go back N
            if self.fin_written and self.una == len(self.stream) + 1:
                self.nxt -= 1
            self.pump()

    def receive(self, packet: bytes) -> None:
        seg = parse_segment(packet, verify_checksum=True)
        options = dict((k, raw) for k, raw in parse_options(seg.options))
        if 8 in options:
            self.ts_recent = struct.unpack_from("!I", options[8], 2)[0]
        if seg.is_rst:
            self.was_reset = True
            self.state = "closed"
            self.rto_at = None
            return
        if self.state == "closed":
            return
        if seg.is_syn:
            if 2 in options:
                self.peer_mss = struct.unpack_from("!H", options[2], 2)[0]
            self.sack_ok = 4 in options
            if self.state in ("listen", "syn-received", "syn-sent") and not seg.is_ack:
                # a new peer, its retransmitted SYN, or a simultaneous open (both SYN-only)
                self.peer_ip, self.peer_port = seg.src, seg.sport
                self.irs = seg.seq
                self.state = "syn-received"
                self._send_syn()
            elif self.state == "syn-sent" and seg.is_ack:
                self.irs = seg.seq
                self.state = "established"
                self.rto_at = None
                self._emit(TCP_ACK)
                self.pump()
            elif self.state == "syn-received" and seg.is_ack and seg.ack == (self.isn + 1) & MASK:
                self.state = "established"  # simultaneous open: the peer's SYN-ACK
                self.rto_at = None
                self.pump()
            elif seg.is_ack:
                self._emit(TCP_ACK)  # a retransmitted SYN-ACK: our ACK was lost
            return
        if self.state == "syn-received":
            if not seg.is_ack or seg.ack != (self.isn + 1) & MASK:
                return
            self.state = "established"
            self.rto_at = None
        if seg.is_ack:
            acked = (seg.ack - self.isn - 1) & MASK
            if self.una < acked <= self.nxt:
                self.una = acked
                self.dupacks = 0
                self.rto_at = self.now + self.RTO if self.nxt > self.una else None
            elif acked == self.una and not seg.payload and self.nxt > self.una:
                self.dupacks += 1
                if self.dupacks == 3:  # fast retransmit of one segment
                    mss = self._payload_room()
                    chunk = bytes(self.stream[self.una : self.una + mss])
                    fin = self.fin_written and self.una + len(chunk) == len(self.stream)
                    self._emit(TCP_ACK | TCP_PSH | (TCP_FIN if fin else 0), chunk, seq=self.isn + 1 + self.una)
        start = (seg.seq - self.irs - 1) & MASK
        if start >= 1 << 31:
            start -= 1 << 32
        if seg.payload or seg.is_fin:
            if seg.is_fin:
                self.peer_fin_at = start + len(seg.payload)
            if start <= len(self.received) and seg.payload:
                piece = seg.payload[len(self.received) - start :]
                self.received += piece
                while self.ooo:
                    ready = [k for k in self.ooo if k <= len(self.received)]
                    if not ready:
                        break
                    for k in ready:
                        self.received += self.ooo.pop(k)[len(self.received) - k :]
            elif start > len(self.received):
                self.ooo[start] = seg.payload
            if self.peer_fin_at is not None and self.peer_fin_at == len(self.received):
                self.peer_fin = True
            self._emit(TCP_ACK)
        elif start < len(self.received) + self.peer_fin:
            self._emit(TCP_ACK)  # a keepalive probe
        self.pump()


class Channel:
    """A wire that loses, duplicates, reorders and re-segments packets, from a seed."""

    def __init__(self, seed: int, loss: float = 0.0, dup: float = 0.0, reorder: float = 0.0,
                 split: float = 0.0) -> None:
        import random

        self.random = random.Random(seed)
        self.loss, self.dup, self.reorder, self.split = loss, dup, reorder, split

    def carry(self, packet: bytes) -> list[tuple[int, bytes]]:
        """(delay in steps, packet) pairs for what leaves the channel."""
        r = self.random
        if r.random() < self.loss:
            return []
        seg = parse_segment(packet)
        pieces = [packet]
        if seg.payload and len(seg.payload) > 1 and r.random() < self.split:
            cut = r.randrange(1, len(seg.payload))
            first = parse_segment(packet)
            first.payload = seg.payload[:cut]
            first.flags &= ~TCP_FIN
            second = parse_segment(packet)
            second.seq = (seg.seq + cut) & MASK
            second.payload = seg.payload[cut:]
            pieces = [serialize_segment(first), serialize_segment(second)]
        out = []
        for piece in pieces:
            delay = r.randrange(1, 40) if r.random() < self.reorder else 0
            out.append((delay, piece))
            if r.random() < self.dup:
                out.append((r.randrange(0, 40), piece))
        return out


class Pair:
    """Two engines, each in front of an Endpoint, joined by a wire (lossless unless a Channel is given)."""

    STEP = 0.0001  # simulated seconds per packet

    def __init__(self, seed: bytes = b"pair", a_config: Configuration | None = None,
                 b_config: Configuration | None = None, a_engine: bool = True, b_engine: bool = True,
                 channel: Channel | None = None, local_channel: Channel | None = None, gso: int = 1,
                 gro: bool = False) -> None:
        self.a = Endpoint(A_IP, 40000, 0xFFFFFF00, gso=gso)  # ISNs near the 2**32 wrap on purpose
        self.b = Endpoint(B_IP, 80, 0x7FFFFFF0, gso=gso)
        self.gro = gro
        self.super_packets = 0  # super-packets the engines handled (GSO out, GRO in)
        self.engine_a = Engine(a_config or seeded_config(seed + b"a")) if a_engine else None
        self.engine_b = Engine(b_config or seeded_config(seed + b"b")) if b_engine else None
        self.channel = channel
        self.local_channel = local_channel  # between each engine and its own stack (toward the stack)
        self.local_lost = 0
        self.wire: list[bytes] = []  # every packet that crossed the wire, in order
        self.now = 0.0
        self._delayed: list[tuple[int, str, bytes]] = []
        self._step = 0
        # A test's stand-in for an engine's `process`, called as NetfilterQueue calls it (a
        # compiled Engine's methods cannot be replaced on the object).
        self.intercept: dict[Engine, Callable[[bytes, Direction, float], Verdict]] = {}

    def open(self) -> Pair:
        """B listens on port 80, A connects; run until the handshake is over."""
        self.b.listen()
        self.a.connect(B_IP, 80)
        self.run()
        return self

    def talk(self, a_data: bytes = b"", b_data: bytes = b"") -> None:
        """Each side writes its data; run until everything is delivered."""
        self.a.write(a_data)
        self.b.write(b_data)
        self.run()

    def close(self) -> None:
        """Both sides close; run until the FINs are through."""
        self.a.close()
        self.b.close()
        self.run()

    def new_connection(self, a_port: int, b_port: int, isn_a: int = 0x10000000, isn_b: int = 0x20000000,
                       b_opens: bool = False) -> None:
        """Fresh endpoints on new ports for a further connection through the same engines; the
        active opener is A's endpoint unless `b_opens`."""
        self.a = Endpoint(A_IP, a_port, isn_a, gso=self.a.gso)
        self.b = Endpoint(B_IP, b_port, isn_b, gso=self.b.gso)
        if b_opens:
            self.a.listen()
            self.b.connect(A_IP, a_port)
        else:
            self.b.listen()
            self.a.connect(B_IP, b_port)
        self.wire = []
        self.run()

    def _through(self, engine: Engine | None, packet: bytes, direction: Direction,
                 info: PacketInfo = UNKNOWN) -> bytes | None:
        if engine is None:
            return packet
        if info.gso:
            self.super_packets += 1
        intercept = self.intercept.get(engine)
        if intercept is not None:
            verdict = intercept(packet, direction, self.now)
        else:
            verdict = engine.process(packet, direction, self.now, info=info)
        if verdict.action is Action.DROP:
            return None
        return verdict.packet if verdict.packet is not None else packet

    def _timers(self) -> list[float]:
        times = [ep.rto_at for ep in (self.a, self.b) if ep.rto_at is not None]
        for engine in (self.engine_a, self.engine_b):
            if engine is not None and (t := engine.get_timer()) is not None:
                times.append(t)
        return times

    def run(self, max_steps: int = 200000, max_time: float = 60.0) -> None:
        """Move packets, and fire timers when the wire is idle, until everything is quiet (or
        `max_time` simulated seconds passed)."""
        max_time += self.now
        queue: deque[tuple[str, bytes]] = deque()
        for _ in range(max_steps):
            for name, ep in (("a", self.a), ("b", self.b)):
                ep.now = self.now
                for packet in ep.out:
                    queue.append((name + "-out", packet))
                ep.out.clear()
            for name, engine in (("a", self.engine_a), ("b", self.engine_b)):
                if engine is None:
                    continue
                for injection in engine.segments_to_inject():
                    to_local = injection.direction is Direction.INBOUND
                    assert to_local == (injection.packet[16:20] == (A_IP if name == "a" else B_IP))
                    queue.append((name + ("-local" if to_local else "-wire"), injection.packet))
            self._step += 1
            ready = [d for d in self._delayed if d[0] <= self._step]
            if ready or (not queue and self._delayed):
                if not ready:
                    ready = [min(self._delayed)]
                for item in ready:
                    self._delayed.remove(item)
                    queue.append(("arrive-" + item[1], item[2]))
            if not queue:
                pending = [t for t in self._timers() if t <= max_time]
                if not pending:
                    return
                self.now = max(self.now, min(pending))
                for ep in (self.a, self.b):
                    ep.on_timer(self.now)
                for engine in (self.engine_a, self.engine_b):
                    if engine is not None and (t := engine.get_timer()) is not None and t <= self.now:
                        engine.handle_timer(self.now)
                continue
            self.now += self.STEP
            where, packet = queue.popleft()
            if where in ("a-out", "b-out"):
                side = where[0]
                gso_size = (self.a if side == "a" else self.b).gso_size.pop(packet, None)
                info = GSO_INFO if gso_size is not None else UNKNOWN
                packet2 = self._through(self.engine_a if side == "a" else self.engine_b, packet, Direction.OUTBOUND,
                                        info)  # fmt: skip
                if packet2 is not None:
                    for piece in _segment(packet2, gso_size) if gso_size is not None else [packet2]:
                        queue.append((side + "-wire", piece))
            elif where.endswith("-wire"):
                other = "b" if where[0] == "a" else "a"
                self._check_size(packet)
                carried = [(0, packet)] if self.channel is None else self.channel.carry(packet)
                for delay, piece in carried:
                    if delay:
                        self._delayed.append((self._step + delay, other, piece))
                    else:
                        queue.append(("arrive-" + other, piece))
            elif where.startswith("arrive-"):
                other = where[-1]
                self.wire.append(packet)
                info = UNKNOWN
                if self.gro:
                    packet, merged = _coalesce(packet, queue, where, self.wire)
                    info = GSO_INFO if merged else UNKNOWN
                packet2 = self._through(self.engine_b if other == "b" else self.engine_a, packet, Direction.INBOUND,
                                        info)  # fmt: skip
                if packet2 is not None:
                    self._to_stack(self.b if other == "b" else self.a, packet2)
            else:  # injected toward the engine's own stack
                self._to_stack(self.a if where[0] == "a" else self.b, packet)
        raise AssertionError("the pair did not go quiet")

    def _to_stack(self, endpoint: Endpoint, packet: bytes) -> None:
        """The leg from an engine to its own stack: lossless unless `local_channel` is set."""
        if self.local_channel is not None and self.local_channel.random.random() < self.local_channel.loss:
            self.local_lost += 1
            return
        endpoint.receive(packet)

    def _check_size(self, packet: bytes) -> None:
        """Every wire segment fits the path: options and payload within both ends' MSS (RFC 6691)."""
        seg = parse_segment(packet)
        limit = min(self.a.mss, self.b.mss)
        size = len(seg.options) + len(seg.payload)
        assert size <= limit, f"wire segment of {size} option and payload bytes over the MSS {limit}"

    def events(self, engine: Engine) -> list:
        out = []
        while (event := engine.next_event()) is not None:
            out.append(event)
        return out


def _segment(packet: bytes, gso_size: int) -> list[bytes]:
    """A super-packet after the verdict, as the kernel segments it: payload in pieces of `gso_size`
    bytes, each with the packet's options (and checksums); FIN and PSH on the last piece only."""
    seg = parse_segment(packet)
    payload, flags = seg.payload, seg.flags
    if len(payload) <= gso_size:
        seg.kernel_checksum = False
        return [serialize_segment(seg)]
    out = []
    for at in range(0, len(payload), gso_size):
        last = at + gso_size >= len(payload)
        piece = parse_segment(packet)
        piece.seq = (seg.seq + at) & MASK
        piece.payload = payload[at : at + gso_size]
        piece.flags = flags if last else flags & ~(TCP_FIN | TCP_PSH)
        out.append(serialize_segment(piece))
    return out


def _coalesce(packet: bytes, queue: deque[tuple[str, bytes]], where: str, wire: list[bytes]) -> tuple[bytes, bool]:
    """GRO: merge the in-order data segments of one flow that wait next in `queue` for the same
    side into `packet`, up to SUPER_PACKET_MAX bytes; ACK-only flags, options of the same length.
    The merged segments are recorded in `wire`. Returns (the packet, whether it merged any)."""
    seg = parse_segment(packet)
    if not seg.payload or seg.flags & ~(TCP_ACK | TCP_PSH):
        return packet, False
    payload = bytearray(seg.payload)
    merged = False
    while queue and queue[0][0] == where:
        nxt = parse_segment(queue[0][1])
        if (nxt.sport, nxt.dport) != (seg.sport, seg.dport) or nxt.seq != (seg.seq + len(payload)) & MASK:
            break
        if not nxt.payload or nxt.flags & ~(TCP_ACK | TCP_PSH) or len(nxt.options) != len(seg.options):
            break
        if len(packet) + len(payload) + len(nxt.payload) > SUPER_PACKET_MAX:
            break
        wire.append(queue.popleft()[1])
        payload += nxt.payload
        seg.ack, seg.window, seg.options, seg.flags = nxt.ack, nxt.window, nxt.options, nxt.flags
        merged = True
    if not merged:
        return packet, False
    seg.payload = bytes(payload)
    return serialize_segment(seg), True
