"""The bounded out-of-order buffer (outoforder.py) against a byte-map model, and its bounds."""

from __future__ import annotations

import os
import random

from nfq_tcpcrypt.core.outoforder import HOLD_TTL, PIECE_OVERHEAD, OutOfOrder
from nfq_tcpcrypt.core.seqmap import RecvStream


def test_matches_a_byte_map_model():
    """Random overlapping pieces of one genuine stream: the held ranges are exactly the union."""
    rng = random.Random(7)
    stream = os.urandom(5000)
    for _ in range(200):
        ooo, model = OutOfOrder(), set()
        for _ in range(30):
            start = rng.randrange(100, 4900)
            end = min(start + rng.randrange(1, 300), 5000)
            assert ooo.add(start, stream[start:end], 100, 1 << 20, 1 << 20, 0.0)
            model.update(range(start, end))
        held = set()
        for lo, hi in ooo.blocks(1000):
            held.update(range(lo, hi))
        assert held == model
        assert ooo.starts == sorted(ooo.starts)
        for start, piece in zip(ooo.starts, ooo.pieces, strict=True):
            assert bytes(piece) == stream[start : start + len(piece)]
        ends = [s + len(p) for s, p in zip(ooo.starts, ooo.pieces, strict=True)]
        assert all(ends[k] < ooo.starts[k + 1] for k in range(len(ends) - 1))  # coalesced
        assert ooo.cost == sum(len(p) for p in ooo.pieces) + PIECE_OVERHEAD * len(ooo.pieces)


def test_bounds_ahead_and_memory_with_overhead():
    recv = RecvStream(0)
    recv.add(2**30, b"x" * 100, 1 << 20)  # far beyond the window: not held
    recv.add(1 << 20, b"x", 1 << 20)  # just beyond
    assert not recv.ooo
    limit = 64 * 1024
    for k in range(10_000):  # 1-byte pieces, each with a gap: the overhead counts
        recv.add(10 + 2 * k, b"y", limit)
    assert recv.ooo.cost <= limit
    assert len(recv.ooo) == limit // (1 + PIECE_OVERHEAD)


def test_forged_piece_does_not_keep_the_genuine_one_out():
    """Differing bytes for one range: both dropped (no SACK for them), the resent genuine kept."""
    genuine, forged = os.urandom(200), os.urandom(200)
    recv = RecvStream(0)
    recv.add(100, forged, 1 << 20)
    assert recv.sack_blocks(4) == [(100, 300)]
    recv.add(100, genuine, 1 << 20)
    assert recv.sack_blocks(4) == [] and recv.ooo.dropped_conflicts == 1
    recv.add(100, genuine, 1 << 20)
    recv.add(0, genuine[:100], 1 << 20)
    assert bytes(recv.buf) == genuine[:100] + genuine and recv.wire_next == 300
    # In-order bytes that differ from a held piece drop that piece too.
    recv.add(400, forged[:50], 1 << 20)
    recv.add(300, genuine, 1 << 20)
    assert not recv.ooo and recv.wire_next == 500


def test_pieces_that_never_line_up_expire():
    recv = RecvStream(0)
    recv.add(1000, b"z" * 100, 1 << 20, now=0.0)
    recv.add(5000, b"z" * 100, 1 << 20, now=HOLD_TTL - 1)
    recv.add(0, b"a", 1 << 20, now=HOLD_TTL + 0.5)
    assert recv.sack_blocks(4) == [(5000, 5100)] and recv.ooo.dropped_expired == 1


def test_daemon_wide_budget_is_shared_and_given_back():
    """All sessions' out-of-order bytes together stay within the engine's budget (README: Memory
    bounds); a session that ends gives its share back."""
    from nfq_tcpcrypt.core.outoforder import Budget

    budget = Budget(10_000)
    first, second = RecvStream(0), RecvStream(0)
    first.ooo.budget = second.ooo.budget = budget
    first.add(100, b"x" * 6000, 1 << 20)
    second.add(100, b"y" * 6000, 1 << 20)  # does not fit any more
    assert budget.used == first.ooo.cost == 6000 + PIECE_OVERHEAD and not second.ooo
    second.add(100, b"y" * 3000, 1 << 20)
    assert budget.used == first.ooo.cost + second.ooo.cost <= budget.limit
    first.ooo.clear()
    second.add(0, b"y" * 100, 1 << 20)  # fills the gap: the piece goes to the buffer
    assert budget.used == 0
    second.add(10_000, b"z" * 6000, 1 << 20)
    assert budget.used == 6000 + PIECE_OVERHEAD


def test_engine_sessions_share_the_budget():
    from nfq_tcpcrypt.lab.tcpmodel import Pair, seeded_config

    pair = Pair(seed=b"budget", b_config=seeded_config(b"budget-b", ooo_total_limit=5000))
    pair.open()
    pair.talk(b"x", b"y")
    session = next(iter(pair.engine_b._sessions.values()))
    assert session.recv.ooo.budget is pair.engine_b.ooo_budget
    session.recv.add(session.recv.wire_next + 100, b"q" * 4000, 1 << 20)
    assert pair.engine_b.ooo_budget.used == 4000 + PIECE_OVERHEAD
    pair.engine_b.abort_all("test", pair.now)
    assert pair.engine_b.ooo_budget.used == 0
