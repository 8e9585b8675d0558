"""docs/states.md is generated from the session's transition table and must be current."""

from __future__ import annotations

from pathlib import Path

from nfq_tcpcrypt.core.session import TRANSITIONS, State
from nfq_tcpcrypt.tools.states import render

PAGE = Path(__file__).resolve().parents[2] / "docs" / "states.md"


def test_committed_page_is_current():
    assert PAGE.read_text() == render(), "run: python -m nfq_tcpcrypt.tools.states --write docs/states.md"


def test_page_lists_every_transition_and_state():
    page = render()
    for (old, trigger), new in TRANSITIONS.items():
        assert f"{old.name.lower()} --> {new.name.lower()}: {trigger.value}" in page
        assert f"| `{old.value}` | {trigger.value} | `{new.value}` |" in page
    for state in State:
        assert f"| `{state.value}` | " in page
