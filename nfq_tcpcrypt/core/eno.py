"""TCP-ENO negotiation (RFC 8547 §4.2–§4.6) with tcpcrypt's TEP rules (RFC 8548 §3.2).

Pure functions over options: what we put in our SYN or SYN-ACK, and what a pair of SYN-form
options negotiated (roles, TEP, transcript). The session decides when to call them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from .config import Configuration
from .constants import ENO_GLOBAL_A, ENO_GLOBAL_B, ENO_OPTION_KIND, TEPS, Role, Tep
from .errors import MalformedSegment
from .resumption import Resumable
from .wire.eno import EnoOption, TepSuboption, parse_eno, serialize_eno

RESUME_HALF: Final = 9
MAX_RESUME_NONCE: Final = 8


class EnoFailed(Exception):
    """ENO must be disabled and the connection stays plain TCP (RFC 8547 §4.6); carries the reason."""


class Negotiated:
    """The outcome of RFC 8547 §4.5: roles, the negotiated TEP and the two SYN-form options.

    A plain class, not a dataclass: a compiled dataclass's constructor is interpreted Python,
    and one is made per connection. Treat as immutable."""

    __slots__ = ("role", "tep", "tep_byte", "eno_a", "eno_b", "peer_a_bit", "resume", "sn")

    def __init__(self, role: Role, tep: Tep, tep_byte: int, eno_a: bytes, eno_b: bytes, peer_a_bit: bool,
                 resume: Resumable | None = None, sn: bytes = b"") -> None:
        self.role = role  # ours
        self.tep = tep
        self.tep_byte = tep_byte  # the TEP's byte as B sent it, v bit included (session ID, RFC 8547 §5.1)
        self.eno_a = eno_a  # A's SYN-form option, verbatim (transcript, RFC 8547 §4.8)
        self.eno_b = eno_b
        self.peer_a_bit = peer_a_bit
        self.resume = resume  # set when the session resumes ss[i] (RFC 8548 §3.5)
        self.sn = sn  # nonce_a | nonce_b by the original roles; empty for a fresh session

    def __repr__(self) -> str:
        return (f"Negotiated(role={self.role!r}, tep={self.tep!r}, tep_byte={self.tep_byte:#x}, "
                f"resume={self.resume!r})")


def _global_byte(config: Configuration, passive: bool) -> int | None:
    value = (ENO_GLOBAL_A if config.eno_app_aware else 0) | (
        ENO_GLOBAL_B if passive or config.eno_role_b else 0
    )
    # A passive opener MUST send an explicit global suboption with b=1 (§4.2); otherwise the
    # implicit 0x00 needs no byte.
    return value if value or passive else None


def syn_option(config: Configuration, resume: Resumable | None = None, nonce: bytes = b"") -> bytes:
    """Our SYN-form option as an active opener, encoded (`our_syn_option`)."""
    return our_syn_option(config, resume, nonce).raw


def our_syn_option(config: Configuration, resume: Resumable | None = None, nonce: bytes = b"") -> EnoOption:
    """Our SYN-form option as an active opener: every TEP we accept (§4.5: A's order is moot),
    with `raw` its encoding (kept for `negotiate`: no need to parse it again).

    With `resume`, its TEP is offered as a resumption suboption (RFC 8548 §3.5: TEP|0x80, our
    identifier half, our nonce), placed last so that it needs no length byte, and not repeated.
    """
    teps = [TepSuboption(int(t)) for t in reversed(config.teps) if resume is None or t != resume.tep]
    if resume is not None:
        teps.append(TepSuboption(int(resume.tep), resume.our_half + nonce, True))
    return _encoded(EnoOption(_global_byte(config, passive=False), tuple(teps)))


def _encoded(option: EnoOption) -> EnoOption:
    option.raw = serialize_eno(option)
    return option


def is_resume_request(sub: TepSuboption) -> bool:
    """A v=1 suboption with an identifier half and a nonce of 0..8 bytes (RFC 8548 §3.5).

    Shorter data means a fresh offer (§3.5: MUST treat as v = 0); longer data breaks the sender's
    MUST, and we do not resume on it (docs/protocol.md T6) but keep it as a fresh offer.
    """
    return sub.v and RESUME_HALF <= len(sub.data) <= RESUME_HALF + MAX_RESUME_NONCE


def single_option(enos: list[bytes]) -> EnoOption:
    """The one SYN-form ENO option of a SYN (§4.1: several count as none; §4.4: ill-formed ones too)."""
    if not enos:
        raise EnoFailed("no eno option")
    if len(enos) > 1:
        raise EnoFailed("several eno options")
    try:
        return parse_eno(enos[0])
    except MalformedSegment as exc:
        raise EnoFailed(f"ill-formed eno option: {exc}") from None


def answer(
    config: Configuration, offer: EnoOption,
    lookup: Callable[[int, bytes], Resumable | None] | None = None,
    nonce: Callable[[], bytes] = bytes,
) -> tuple[bytes, Resumable | None]:
    """Our SYN-ACK option as passive opener (host B), encoded, and the secret we agreed to resume
    (`answer_option`)."""
    option, found = answer_option(config, offer, lookup, nonce)
    return option.raw, found


def answer_option(
    config: Configuration, offer: EnoOption,
    lookup: Callable[[int, bytes], Resumable | None] | None = None,
    nonce: Callable[[], bytes] = bytes,
) -> tuple[EnoOption, Resumable | None]:
    """Our SYN-ACK option as passive opener (host B), with `raw` its encoding, and the secret we
    agreed to resume, if any.

    A resumption request whose identifier half `lookup` finds (with the cached TEP) is answered with
    our half and our nonce (RFC 8548 §3.5: SHOULD agree). Otherwise we answer the one TEP we prefer
    among A's valid ones, fresh (v = 0).
    """
    valid = _valid_teps(config, offer)
    if lookup is not None:
        for sub in offer.teps:
            if sub.tep in valid and is_resume_request(sub):
                found = lookup(sub.tep, sub.data[:RESUME_HALF])
                if found is not None:
                    ours = TepSuboption(sub.tep, found.our_half + nonce(), True)
                    return _encoded(EnoOption(_global_byte(config, passive=True), (ours,))), found
    choice = next((t for t in config.teps if int(t) in valid), None)
    if choice is None:
        raise EnoFailed("no common tep")
    return _encoded(EnoOption(_global_byte(config, passive=True), (TepSuboption(int(choice)),))), None


def negotiate(
    config: Configuration, ours: EnoOption, theirs: EnoOption, resume: Resumable | None = None
) -> Negotiated:
    """Roles and negotiated TEP from both SYN-form options (§4.3, §4.5, §4.6 rule 3).

    `resume` is the secret we offered (active opener) or agreed to (passive opener). B's suboption
    with data is a resumption answer; it counts only if its identifier half is the one we expect,
    and is ignored otherwise (RFC 8548 §3.5), which usually leaves no valid TEP: plain TCP.
    """
    if ours.b == theirs.b:
        raise EnoFailed(f"both sides sent b={int(ours.b)}")
    if config.eno_app_aware_mandatory and not theirs.a:
        raise EnoFailed("peer is not application-aware (mandatory mode)")
    role = Role.B if ours.b else Role.A
    a_option, b_option = (theirs, ours) if ours.b else (ours, theirs)
    valid = _valid_teps(config, a_option) & _valid_teps(config, b_option)
    # The negotiated TEP is the last valid TEP in B's option; the v bit is not compared (§4.5).
    chosen = [sub for sub in b_option.teps if sub.tep in valid and _answer_ok(sub, role, ours, resume)]
    if not chosen:
        raise EnoFailed("no valid tep")
    last = chosen[-1]
    if not last.data:
        return Negotiated(role, TEPS[last.tep], last.byte, a_option.raw, b_option.raw, theirs.a)
    assert resume is not None
    # sn[i] = nonce_a | nonce_b, labelled by the ORIGINAL roles (docs/protocol.md T10).
    mine = _suboption(ours, last.tep).data[RESUME_HALF:]
    peers = _suboption(theirs, last.tep).data[RESUME_HALF:]
    sn = mine + peers if resume.original_role is Role.A else peers + mine
    return Negotiated(role, TEPS[last.tep], last.byte, a_option.raw, b_option.raw, theirs.a, resume, sn)


def _suboption(option: EnoOption, tep: int) -> TepSuboption:
    return next(sub for sub in option.teps if sub.tep == tep)


def _answer_ok(sub: TepSuboption, role: Role, ours: EnoOption, resume: Resumable | None) -> bool:
    """Whether B's suboption `sub` is usable: fresh, or a resumption both sides asked for."""
    if not sub.data:
        return True
    if resume is None or sub.tep != int(resume.tep) or not is_resume_request(sub):
        return False
    if role is Role.B:
        return True  # our own answer, built from the secret we found
    ours_sub = _suboption(ours, sub.tep)
    return is_resume_request(ours_sub) and sub.data[:RESUME_HALF] == resume.peer_half


def _valid_teps(config: Configuration, option: EnoOption) -> set[int]:
    """TEPs of `option` we support that tcpcrypt can use from it (§4.5 rules 2 and 3).

    tcpcrypt defines no repeated suboptions, so a TEP listed twice is not valid. Suboption data is
    only meaningful as a resumption request; until resumption is in use, a TEP with data counts as
    a fresh offer (a v=1 offer implies a fresh key exchange is acceptable, RFC 8548 §3.2).
    """
    return unrepeated_teps(option).intersection(config.teps)  # Tep is an IntEnum: hashed as its int


def unrepeated_teps(option: EnoOption) -> set[int]:
    """The TEPs `option` lists exactly once: tcpcrypt defines no repeated suboptions (§4.5 rule 2)."""
    teps = [sub.tep for sub in option.teps]  # a few at most (40 bytes of options)
    return {tep for tep in teps if teps.count(tep) == 1}


def eno_options(options: list[tuple[int, bytes]]) -> list[bytes]:
    """The raw ENO options in a parsed options list."""
    return [raw for kind, raw in options if kind == ENO_OPTION_KIND]
