"""A small TCP endpoint model and a two-engine harness over an in-memory wire (DESIGN.md §8).

The model is just enough TCP to drive the engines: handshake with MSS/SACK-permitted/timestamps/
window scale, cumulative ACKs, MSS-sized segments, FIN and RST. It never retransmits; the harness's
channel is in order and lossless.
"""

from __future__ import annotations

import hashlib
import struct
from collections import deque

from nfq_tcpcrypt.core.config import Configuration
from nfq_tcpcrypt.core.constants import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN
from nfq_tcpcrypt.core.engine import Engine
from nfq_tcpcrypt.core.flow import Direction
from nfq_tcpcrypt.core.kex import SystemKeyFactory
from nfq_tcpcrypt.core.verdict import Action
from nfq_tcpcrypt.core.wire.tcp import new_segment, parse_options, parse_segment, serialize_segment

A_IP = bytes([10, 77, 0, 1])
B_IP = bytes([10, 77, 0, 2])
MASK = 0xFFFFFFFF


class SeededRandom:
    """Deterministic bytes from SHAKE-256 of a seed (STYLE.md §8)."""

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._counter = 0

    def __call__(self, n: int) -> bytes:
        self._counter += 1
        return hashlib.shake_256(self._seed + self._counter.to_bytes(8, "big")).digest(n)


class SeededKeyFactory(SystemKeyFactory):
    """Private keys built from a seeded stream, so equal seeds give equal transcripts."""

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
    """One TCP endpoint (the "local stack" behind an engine)."""

    def __init__(self, ip: bytes, port: int, isn: int, mss: int = 1460) -> None:
        self.ip, self.port, self.isn, self.mss = ip, port, isn, mss
        self.peer_ip = b""
        self.peer_port = 0
        self.state = "closed"
        self.snd_nxt = isn
        self.snd_una = isn
        self.rcv_nxt = 0
        self.peer_mss = 536
        self.pending = b""  # written, not yet sent
        self.fin_pending = False
        self.received = bytearray()
        self.peer_fin = False
        self.was_reset = False
        self.out: list[bytes] = []
        self.ts = 1000
        self.ts_recent = 0

    def _emit(self, flags: int, payload: bytes = b"", options: bytes | None = None, seq: int | None = None) -> None:
        self.ts += 1
        if options is None:
            options = struct.pack("!BBBBII", 1, 1, 8, 10, self.ts, self.ts_recent)
        seg = new_segment(
            self.ip, self.peer_ip, self.port, self.peer_port, self.snd_nxt if seq is None else seq,
            self.rcv_nxt if flags & TCP_ACK else 0, flags, 1000, options, payload,
        )
        self.out.append(serialize_segment(seg))

    def _syn_options(self) -> bytes:
        return struct.pack("!BBH", 2, 4, self.mss) + b"\x04\x02" + struct.pack("!BBII", 8, 10, self.ts, 0) + b"\x01\x03\x03\x07"

    def connect(self, peer_ip: bytes, peer_port: int) -> None:
        self.peer_ip, self.peer_port = peer_ip, peer_port
        self.state = "syn-sent"
        self._emit(TCP_SYN, options=self._syn_options())
        self.snd_nxt = (self.isn + 1) & MASK

    def listen(self) -> None:
        self.state = "listen"

    def write(self, data: bytes) -> None:
        self.pending += data
        self.pump()

    def close(self) -> None:
        self.fin_pending = True
        self.pump()

    def pump(self) -> None:
        if self.state != "established":
            return
        mss = min(self.mss, self.peer_mss)
        while self.pending:
            chunk, self.pending = self.pending[:mss], self.pending[mss:]
            fin = self.fin_pending and not self.pending
            self._emit(TCP_ACK | TCP_PSH | (TCP_FIN if fin else 0), chunk)
            self.snd_nxt = (self.snd_nxt + len(chunk) + fin) & MASK
            if fin:
                self.fin_pending = False
                self.state = "fin-sent"
        if self.fin_pending:
            self._emit(TCP_ACK | TCP_FIN)
            self.snd_nxt = (self.snd_nxt + 1) & MASK
            self.fin_pending = False
            self.state = "fin-sent"

    def receive(self, packet: bytes) -> None:
        seg = parse_segment(packet, verify_checksum=True)
        options = dict((k, raw) for k, raw in parse_options(seg.options))
        if 8 in options:
            self.ts_recent = struct.unpack_from("!I", options[8], 2)[0]
        if seg.is_rst:
            self.was_reset = True
            self.state = "closed"
            return
        if seg.is_syn:
            if 2 in options:
                self.peer_mss = struct.unpack_from("!H", options[2], 2)[0]
            if self.state == "listen" and not seg.is_ack:
                self.peer_ip, self.peer_port = seg.src, seg.sport
                self.rcv_nxt = (seg.seq + 1) & MASK
                self.state = "syn-received"
                self._emit(TCP_SYN | TCP_ACK, options=self._syn_options())
                self.snd_nxt = (self.isn + 1) & MASK
            elif self.state == "syn-sent" and seg.is_ack:
                self.rcv_nxt = (seg.seq + 1) & MASK
                self.snd_una = seg.ack
                self.state = "established"
                self._emit(TCP_ACK)
                self.pump()
            return
        if self.state == "syn-received" and seg.is_ack:
            self.state = "established"
        if seg.is_ack:
            self.snd_una = seg.ack
        if seg.payload or seg.is_fin:
            if seg.seq == self.rcv_nxt:
                self.received += seg.payload
                self.rcv_nxt = (self.rcv_nxt + len(seg.payload)) & MASK
                if seg.is_fin:
                    self.peer_fin = True
                    self.rcv_nxt = (self.rcv_nxt + 1) & MASK
            self._emit(TCP_ACK)
        self.pump()


class Pair:
    """Two engines, each in front of an Endpoint, joined by an in-order, lossless wire."""

    def __init__(self, seed: bytes = b"pair", a_config: Configuration | None = None,
                 b_config: Configuration | None = None, a_engine: bool = True, b_engine: bool = True) -> None:
        self.a = Endpoint(A_IP, 40000, 0xFFFFFF00)  # ISNs near the 2**32 wrap on purpose
        self.b = Endpoint(B_IP, 80, 0x7FFFFFF0)
        self.engine_a = Engine(a_config or seeded_config(seed + b"a")) if a_engine else None
        self.engine_b = Engine(b_config or seeded_config(seed + b"b")) if b_engine else None
        self.wire: list[bytes] = []  # every packet that crossed the wire, in order
        self.now = 0.0

    def _through(self, engine: Engine | None, packet: bytes, direction: Direction) -> bytes | None:
        if engine is None:
            return packet
        verdict = engine.process(packet, direction, self.now)
        if verdict.action is Action.DROP:
            return None
        return verdict.packet if verdict.packet is not None else packet

    def run(self, max_steps: int = 100000) -> None:
        """Move packets until every queue is empty."""
        queue: deque[tuple[str, bytes]] = deque()
        for _ in range(max_steps):
            for name, ep in (("a", self.a), ("b", self.b)):
                for packet in ep.out:
                    queue.append((name + "-out", packet))
                ep.out.clear()
            for name, engine in (("a", self.engine_a), ("b", self.engine_b)):
                if engine is None:
                    continue
                for packet in engine.segments_to_inject():
                    to_local = packet[16:20] == (A_IP if name == "a" else B_IP)
                    queue.append((name + ("-local" if to_local else "-wire"), packet))
            if not queue:
                return
            where, packet = queue.popleft()
            if where in ("a-out", "b-out"):
                side = where[0]
                packet2 = self._through(self.engine_a if side == "a" else self.engine_b, packet, Direction.OUTBOUND)
                if packet2 is not None:
                    queue.append((side + "-wire", packet2))
            elif where.endswith("-wire"):
                self.wire.append(packet)
                other = "b" if where[0] == "a" else "a"
                packet2 = self._through(self.engine_b if other == "b" else self.engine_a, packet, Direction.INBOUND)
                if packet2 is not None:
                    (self.b if other == "b" else self.a).receive(packet2)
            else:  # injected toward the engine's own stack
                (self.a if where[0] == "a" else self.b).receive(packet)
        raise AssertionError("the pair did not go quiet")

    def events(self, engine: Engine) -> list:
        out = []
        while (event := engine.next_event()) is not None:
            out.append(event)
        return out
