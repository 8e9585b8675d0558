"""The TCP-ENO option and its suboptions (RFC 8547 §4.1–§4.4)."""

from __future__ import annotations

from typing import Final

from ..constants import ENO_GLOBAL_A, ENO_GLOBAL_B, ENO_OPTION_KIND, ENO_TEP_MIN, ENO_V_BIT
from ..errors import MalformedSegment

MAX_LENGTH_BYTE_DATA: Final = 32  # RFC 8547 §4.4: nnnnn + 1


class TepSuboption:
    """RFC 8547 §4.1: a TEP identifier (0x20–0x7f), its v bit and optional suboption data.

    A value (equal when its fields are; treat as immutable); a plain class rather than a frozen
    dataclass, whose constructor stays interpreted when compiled: several are made per SYN."""

    __slots__ = ("tep", "data", "v")

    def __init__(self, tep: int, data: bytes = b"", v: bool = False) -> None:
        self.tep = tep
        self.data = data
        self.v = v

    @property
    def byte(self) -> int:
        """The suboption's first byte as sent (TEP id with the v bit)."""
        return self.tep | (ENO_V_BIT if self.v else 0)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TepSuboption):
            return NotImplemented
        return self.tep == other.tep and self.data == other.data and self.v == other.v

    def __hash__(self) -> int:
        return hash((self.tep, self.data, self.v))

    def __repr__(self) -> str:
        return f"TepSuboption(tep={self.tep!r}, data={self.data!r}, v={self.v!r})"


class EnoOption:
    """RFC 8547 §4.1: a SYN-form ENO option.

    `global_byte` is the first global suboption (RFC 8547 §4.2: only the first counts), None when the
    option has none (an implicit 0x00). `raw` is the option exactly as it was on the wire, kind and
    length included: the transcript of RFC 8547 §4.8 is built from it; it takes no part in
    equality. A value like TepSuboption, and a plain class for the same reason.
    """

    __slots__ = ("global_byte", "teps", "raw")

    def __init__(self, global_byte: int | None = None, teps: tuple[TepSuboption, ...] = (), raw: bytes = b"") -> None:
        self.global_byte = global_byte
        self.teps = teps
        self.raw = raw

    @property
    def b(self) -> bool:
        """The passive-role bit (RFC 8547 §4.2)."""
        return bool((self.global_byte or 0) & ENO_GLOBAL_B)

    @property
    def a(self) -> bool:
        """The application-aware bit (RFC 8547 §4.2)."""
        return bool((self.global_byte or 0) & ENO_GLOBAL_A)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EnoOption):
            return NotImplemented
        return self.global_byte == other.global_byte and self.teps == other.teps

    def __hash__(self) -> int:
        return hash((self.global_byte, self.teps))

    def __repr__(self) -> str:
        return f"EnoOption(global_byte={self.global_byte!r}, teps={self.teps!r}, raw={self.raw!r})"


def parse_eno(raw: bytes) -> EnoOption:
    """Decode a SYN-form ENO option (kind and length included), per RFC 8547 §4.1 and §4.4.

    Raises MalformedSegment for the two length-byte errors of §4.4, the only ill-formed SYN-form
    options the RFC defines (docs/protocol.md E2): the caller then treats the SYN as having
    no ENO option. Unknown TEP ids and reserved global bits are well-formed.
    """
    if len(raw) < 2 or raw[0] != ENO_OPTION_KIND or raw[1] != len(raw):
        raise MalformedSegment(f"not an eno option: {raw[:2].hex()}")
    global_byte = None
    teps = []
    i = 2
    n = len(raw)
    while i < n:
        c = raw[i]
        if c < ENO_TEP_MIN:
            if global_byte is None:
                global_byte = c
            i += 1
        elif c < ENO_V_BIT:
            teps.append(TepSuboption(c))
            i += 1
        elif c < ENO_V_BIT | ENO_TEP_MIN:
            size = (c & 0x1F) + 1
            if i + 2 + size > n:
                raise MalformedSegment(f"eno length byte {c:#04x} runs past the option")
            t = raw[i + 1]
            if t < ENO_V_BIT | ENO_TEP_MIN:
                raise MalformedSegment(f"eno length byte followed by {t:#04x}, not a TEP with v=1")
            teps.append(TepSuboption(t & 0x7F, bytes(raw[i + 2 : i + 2 + size]), True))
            i += 2 + size
        else:
            teps.append(TepSuboption(c & 0x7F, bytes(raw[i + 1 :]), True))
            i = n
    return EnoOption(global_byte, tuple(teps), bytes(raw))


def serialize_eno(option: EnoOption) -> bytes:
    """Encode a SYN-form ENO option; data-bearing suboptions that are not last get a length byte."""
    body = bytearray()
    if option.global_byte is not None:
        body.append(option.global_byte)
    last = len(option.teps) - 1
    for index, sub in enumerate(option.teps):
        if not ENO_TEP_MIN <= sub.tep < ENO_V_BIT:
            raise ValueError(f"tep id {sub.tep:#04x} outside 0x20-0x7f")
        if sub.data and index != last:
            if len(sub.data) > MAX_LENGTH_BYTE_DATA:
                raise ValueError(f"suboption data of {len(sub.data)} bytes needs to be last")
            body.append(ENO_V_BIT | (len(sub.data) - 1))
        if sub.data and not sub.v:
            raise ValueError("suboption data requires v=1")
        body.append(sub.byte)
        body += sub.data
    if len(body) + 2 > 40:
        raise ValueError(f"eno option of {len(body) + 2} bytes")
    return bytes((ENO_OPTION_KIND, len(body) + 2)) + bytes(body)


# RFC 8547 §4.1: the non-SYN form; tcpcrypt gives it no contents (RFC 8548 §3.2).
NON_SYN_ENO: Final = bytes((ENO_OPTION_KIND, 2))
