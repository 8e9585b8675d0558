"""Fuzz targets: the packet parser and the frame decoder, and a live engine pair.

Each target takes arbitrary bytes and may raise only the project's own protocol errors. Run them
under atheris when it is installed (`python -m tests.fuzz.targets packet`), or through the bounded
mutation loop that the test suite runs (tests/fuzz/test_fuzz.py).
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable

from nfq_tcpcrypt.core.aead import FrameCipher
from nfq_tcpcrypt.core.constants import Aead, Tep
from nfq_tcpcrypt.core.errors import LocalProtocolError, TcpcryptError
from nfq_tcpcrypt.core.flow import Direction
from nfq_tcpcrypt.core.seqmap import RecvStream
from nfq_tcpcrypt.core.wire.eno import parse_eno
from nfq_tcpcrypt.core.wire.icmp import parse_icmp_error
from nfq_tcpcrypt.core.wire.tcp import parse_options, parse_segment
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
    """Mutations of a real transcript fed to fresh engines mid-connection, in both directions."""

    def __init__(self) -> None:
        from tests.core.tcpmodel import Pair

        pair = Pair(seed=b"fuzz")
        pair.open()
        pair.talk(b"q" * 5000, b"r" * 5000)
        self.corpus = list(pair.wire)
        self._pair_factory = lambda: Pair(seed=b"fuzz")

    def __call__(self, data: bytes) -> None:

        pair = self._pair_factory()
        pair.open()
        for engine in (pair.engine_a, pair.engine_b):
            for direction in Direction:
                try:
                    engine.process(data, direction, pair.now)
                except LocalProtocolError:
                    raise
                engine.segments_to_inject()


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


def run_bounded(target: Callable[[bytes], None], corpus: list[bytes], seconds: float, seed: int) -> int:
    """Feed mutated inputs to `target` for `seconds`; return how many ran."""
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    count = 0
    while time.monotonic() < deadline:
        target(mutate(rng, corpus))
        count += 1
    return count


if __name__ == "__main__":  # pragma: no cover - manual atheris runs
    import atheris  # type: ignore[import-not-found]

    targets = {"packet": packet_target, "frame": frame_target}
    atheris.Setup(sys.argv[:1] + sys.argv[2:], targets[sys.argv[1]])
    atheris.Fuzz()
