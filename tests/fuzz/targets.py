"""Fuzz targets: the packet parser and the frame decoder, and a live engine pair.

Each target takes arbitrary bytes and may raise only the project's own protocol errors. Run them
under atheris when it is installed (`python -m tests.fuzz.targets packet`), or through the bounded
mutation loop that the test suite runs (tests/fuzz/test_fuzz.py).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable

from nfq_tcpcrypt.core.aead import FrameCipher
from nfq_tcpcrypt.core.constants import Aead, Tep
from nfq_tcpcrypt.core.errors import TcpcryptError
from nfq_tcpcrypt.core.flow import Direction
from nfq_tcpcrypt.core.seqmap import RecvStream
from nfq_tcpcrypt.core.wire.eno import parse_eno
from nfq_tcpcrypt.core.wire.icmp import parse_icmp_error
from nfq_tcpcrypt.core.wire.tcp import parse_options, parse_segment, serialize_segment
from nfq_tcpcrypt.core.wire.tcpcrypt import parse_init1, parse_init2

_CIPHER = FrameCipher(Aead.AES_128_GCM, bytes(28))


def packet_target(data: bytes) -> None:
    """IP/TCP, options, ENO and ICMP parsing of arbitrary bytes."""
    try:
        parse_icmp_error(data)
        seg = parse_segment(data, verify_checksum=True)
    except TcpcryptError:
        return
    try:
        for kind, raw in parse_options(seg.options):
            if kind == 69:
                parse_eno(raw)
    except TcpcryptError:
        pass


def frame_target(data: bytes) -> None:
    """Init messages and the frame decoder (reassembly buffer + AEAD open) on arbitrary bytes."""
    for tep in Tep:
        for parse in (parse_init1, parse_init2):
            try:
                parse(data, tep)
            except TcpcryptError:
                pass
    stream = RecvStream(0)
    stream.cipher = _CIPHER
    stream.add(0, data, 1 << 20)
    while True:
        item = stream.next_frame()
        if item is None:
            break
        try:
            _CIPHER.open(*item)
        except TcpcryptError:
            pass


class EngineTarget:
    """Mutations of a real transcript fed to fresh engines mid-connection, in both directions.

    Most inputs are mutated above the port numbers and resealed with valid lengths and checksums, so
    that they reach a session's logic instead of dying at the checksum; `reached` counts the inputs
    that some engine handed to a session.
    """

    def __init__(self) -> None:
        from nfq_tcpcrypt.lab.tcpmodel import Pair

        pair = Pair(seed=b"fuzz")
        pair.open()
        pair.talk(b"q" * 5000, b"r" * 5000)
        self.corpus = list(pair.wire)
        self._pair_factory = lambda: Pair(seed=b"fuzz")
        self.runs = 0
        self.reached = 0

    def __call__(self, data: bytes) -> None:
        pair = self._pair_factory()
        pair.open()
        reached = False
        for engine in (pair.engine_a, pair.engine_b):
            for direction in Direction:
                before = engine.counters["malformed"] + engine.counters["untracked"]
                engine.process(data, direction, pair.now)  # only LocalProtocolError (a bug) may escape
                reached |= engine.counters["malformed"] + engine.counters["untracked"] == before
                engine.segments_to_inject()
                engine.handle_timer(pair.now + 5.0)  # the timers of whatever the input started
                engine.segments_to_inject()
        self.runs += 1
        self.reached += reached


def reseal(data: bytes) -> bytes:
    """`data` with fresh IP lengths and IP/TCP checksums when it still parses as IP/TCP."""
    fixed = bytearray(data)
    if len(fixed) >= 40 and fixed[0] >> 4 == 4:
        fixed[2:4] = len(fixed).to_bytes(2, "big")
    elif len(fixed) >= 40 and fixed[0] >> 4 == 6:
        fixed[4:6] = (len(fixed) - 40).to_bytes(2, "big")
    try:
        return serialize_segment(parse_segment(bytes(fixed)))
    except TcpcryptError:
        return data


def mutate_sealed(rng: random.Random, corpus: list[bytes]) -> bytes:
    """A corpus packet mutated past its addresses and ports (mostly), then resealed (mostly)."""
    packet = rng.choice(corpus)
    head = (20 if packet[0] >> 4 == 4 else 40) + 4
    body = mutate(rng, [packet[head:]]) if rng.random() < 0.9 else b""
    data = packet[:head] + body if body else mutate(rng, corpus)
    return reseal(data) if rng.random() < 0.9 else data


def mutate(rng: random.Random, corpus: list[bytes]) -> bytes:
    """A random input: a corpus entry with flipped bits, cuts, splices or random bytes."""
    choice = rng.random()
    if choice < 0.1 or not corpus:
        return rng.randbytes(rng.randrange(0, 200))
    data = bytearray(rng.choice(corpus))
    for _ in range(rng.randrange(1, 6)):
        op = rng.random()
        if op < 0.5 and data:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op < 0.7 and data:
            data = data[: rng.randrange(len(data))]
        elif op < 0.85:
            i = rng.randrange(len(data) + 1)
            data[i:i] = rng.randbytes(rng.randrange(1, 8))
        elif data:
            i = rng.randrange(len(data))
            data[i] = rng.choice((0, 1, 2, 0x45, 0x7F, 0x80, 0xFF))
    return bytes(data)


def run_bounded(
    target: Callable[[bytes], None],
    corpus: list[bytes],
    iterations: int,
    seed: int,
    mutator: Callable[[random.Random, list[bytes]], bytes] = mutate,
) -> None:
    """Feed `iterations` mutated inputs, reproducible from `seed`, to `target`."""
    rng = random.Random(seed)
    for _ in range(iterations):
        target(mutator(rng, corpus))


if __name__ == "__main__":  # pragma: no cover - manual atheris runs
    import atheris  # type: ignore[import-not-found]

    targets = {"packet": packet_target, "frame": frame_target}
    atheris.Setup(sys.argv[:1] + sys.argv[2:], targets[sys.argv[1]])
    atheris.Fuzz()
