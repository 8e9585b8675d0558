"""A do-nothing engine with the Engine surface: the bench's pass-through NFQUEUE baseline (README: Benchmark)."""

from __future__ import annotations

from ..core.events import Event
from ..core.flow import Direction
from ..core.verdict import ACCEPT, UNKNOWN, Injection, PacketInfo, Verdict


class PassThroughEngine:
    """Accepts every packet unchanged; same queues, rules and loop as the real daemon."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}

    def process(self, packet: bytes, direction: Direction, now: float, encrypted: bool = False,
                info: PacketInfo = UNKNOWN) -> Verdict:
        """Accept unchanged."""
        return ACCEPT

    def segments_to_inject(self) -> list[Injection]:
        """Nothing to inject."""
        return []

    def get_timer(self) -> float | None:
        """No timers."""
        return None

    def handle_timer(self, now: float) -> None:
        """No timers."""

    def next_event(self) -> Event | None:
        """No events."""
        return None

    def session_table(self) -> list[dict[str, object]]:
        """No sessions."""
        return []

    def cache_info(self, now: float) -> list[dict[str, object]]:
        """No cache."""
        return []

    def flush_cache(self, reason: str, peer: bytes | None = None) -> int:
        """No cache."""
        return 0

    def abort_all(self, reason: str, now: float) -> int:
        """No sessions."""
        return 0

    def prepare_wanted(self, now: float) -> bool:
        """Nothing to prepare."""
        return False

    def prepare(self, now: float) -> bool:
        """Nothing to prepare."""
        return False
