"""Bounded fuzzing in the suite: mutated and random inputs raise only our own errors."""

from __future__ import annotations

from tests.fuzz.targets import EngineTarget, frame_target, packet_target, run_bounded


def test_packet_parser_fuzz():
    engine = EngineTarget()
    assert run_bounded(packet_target, engine.corpus, seconds=3.0, seed=1) > 1000


def test_frame_decoder_fuzz():
    engine = EngineTarget()
    payloads = [p[52:] for p in engine.corpus if len(p) > 52]
    assert run_bounded(frame_target, payloads, seconds=3.0, seed=2) > 300


def test_engine_fuzz():
    engine = EngineTarget()
    assert run_bounded(engine, engine.corpus, seconds=4.0, seed=3) > 50
