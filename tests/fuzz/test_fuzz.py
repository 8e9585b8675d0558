"""Bounded fuzzing in the suite: mutated and random inputs raise only our own errors.

Bounded by iterations, not seconds, so every run feeds the same inputs (seeded). A longer run:
`NFQ_TCPCRYPT_FUZZ_SCALE=100 pytest tests/fuzz`.
"""

from __future__ import annotations

import os

from tests.fuzz.targets import EngineTarget, frame_target, mutate_sealed, packet_target, run_bounded

SCALE = int(os.environ.get("NFQ_TCPCRYPT_FUZZ_SCALE", "1"))


def test_packet_parser_fuzz():
    engine = EngineTarget()
    run_bounded(packet_target, engine.corpus, 50000 * SCALE, seed=1)


def test_frame_decoder_fuzz():
    engine = EngineTarget()
    payloads = [p[52:] for p in engine.corpus if len(p) > 52]
    run_bounded(frame_target, payloads, 10000 * SCALE, seed=2)


def test_engine_fuzz():
    engine = EngineTarget()
    run_bounded(engine, engine.corpus, 3000 * SCALE, seed=3, mutator=mutate_sealed)
    assert engine.runs == 3000 * SCALE
    # Resealed mutations must mostly get past the checksum to a session, or the fuzz tests nothing.
    assert engine.reached >= engine.runs // 2, (engine.reached, engine.runs)
