"""`nfq-tcpcrypt decode`: a capture's TCP-ENO negotiation, tcpcrypt framing and, with a key log, plaintext.

Reads pcap/pcapng one record at a time (`pcapread`), reassembles each direction of each TCP
connection (`reassembly`), and walks the framing stream of RFC 8548 §4: Init1/Init2 (fresh sessions),
then frames `control | clen | ciphertext`. With a key log (`keylogread`) it recomputes ss[0] from the
ES line and the captured ENO options and Init messages (RFC 8548 §3.3), or finds ss[i] of a resumed
session (§3.5), and verifies and decrypts every frame with the core's `KeySchedule` and `FrameCipher`.
The protocol itself lives in `core/`; nothing here re-implements it.

Every malformed thing becomes a `Problem` in the report, located by packet number (1-based, as
Wireshark counts) and stream offset (from ISN+1, the frame-ID origin of docs/protocol.md T1).
The JSON form is documented in `decode_schema.md` beside this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from ..core.aead import FrameCipher, traffic_key_len
from ..core.constants import (
    AEAD_NAMES,
    ENO_OPTION_KIND,
    FRAME_HEADER_LEN,
    INIT1_MAGIC,
    INIT2_MAGIC,
    MAX_INIT_LEN,
    TAG_LEN,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    TEP_NAMES,
    Aead,
    Tep,
)
from ..core.eno import RESUME_HALF, unrepeated_teps
from ..core.errors import IntegrityError, MalformedSegment
from ..core.flow import format_endpoint
from ..core.kex import KeySchedule, session_secret
from ..core.wire.eno import EnoOption, parse_eno
from ..core.wire.tcp import Segment, parse_options, parse_segment
from ..core.wire.tcpcrypt import (
    control_known,
    frame_data,
    frame_urgent,
    init_message_length,
    is_rekey,
    parse_init1,
    parse_init2,
    unpack_frame_header,
)
from .keylogread import KeyLog, load_keylog
from .pcapread import CaptureReader, ip_packet
from .reassembly import Gap, StreamReassembler

SCHEMA = "nfq-tcpcrypt-decode/1"
MIN_CLEN = TAG_LEN + 1  # tag and the flags byte (RFC 8548 §4.2)
SAMPLE_LEN = 64 * 1024  # payload bytes sampled per direction for the plaintext heuristic
MAX_PROBLEMS = 200  # listed per connection; the rest are counted
PENDING_LIMIT = 64 << 20  # frame bytes held per direction while keys are undecided
RESYNC_WINDOW = 1 << 20  # bytes searched for a frame boundary after a gap
PLAINTEXT_RATIO = 0.75  # printable share above which bytes "look like text"
_PRINTABLE = bytes(range(0x20, 0x7F)) + b"\t\r\n"


# ---------------------------------------------------------------------------------------- report


@dataclass
class Problem:
    """A malformed, missing or unverifiable thing, where it was found."""

    kind: str
    message: str
    packet: int | None = None
    side: str | None = None  # "client" / "server": the sender of the stream it is in
    offset: int | None = None  # stream offset (from ISN+1) in that sender's stream


@dataclass
class SuboptionReport:
    """One TEP suboption of a SYN-form ENO option (RFC 8547 §4.1)."""

    byte: int
    tep: int
    name: str | None
    v: bool
    data: str
    resume_half: str | None = None  # RFC 8548 §3.5: identifier half (9 bytes) when v=1
    nonce: str | None = None  # the resumption nonce after the half


@dataclass
class EnoReport:
    """A SYN-form ENO option as captured."""

    raw: str
    global_byte: int | None
    b: bool
    a: bool
    suboptions: list[SuboptionReport]


@dataclass
class InitReport:
    """Init1 or Init2 (RFC 8548 §4.1) as found at offset 0 of its sender's stream."""

    message: str  # "init1" / "init2"
    length: int
    packet: int | None
    sym_ciphers: list[int]  # Init1: the list offered; Init2: the one chosen
    nonce: str  # N_A / N_B
    public_key: str
    ignored_len: int


@dataclass
class DirectionReport:
    """One sender's byte stream and what it contained."""

    side: str
    sender: str
    receiver: str
    role: str | None = None  # ENO role of the sender, "A" / "B"
    isn: int | None = None
    offsets_exact: bool = True
    stream_bytes: int = 0
    repeated_bytes: int = 0
    gaps: list[dict[str, int]] = field(default_factory=list)
    fin_offset: int | None = None
    rst: bool = False
    framing: str = "none"  # "init+frames" / "frames" / "raw" / "none"
    framing_valid: bool | None = None
    frames: int = 0
    frame_bytes: int = 0
    clen_min: int | None = None
    clen_max: int | None = None
    rekeys: list[int] = field(default_factory=list)  # offsets of frames with the rekey bit
    finp_offset: int | None = None
    urgent_frames: int = 0
    verified: int = 0
    failed: int = 0
    undecrypted: int = 0
    unparsed_bytes: int = 0
    trailing_bytes: int = 0  # an incomplete frame or Init message at the end of the capture
    plaintext_bytes: int = 0
    plaintext_sha256: str | None = None
    plaintext_complete: bool = False
    plaintext_file: str | None = None
    printable_ratio: float | None = None
    could_be_plaintext: bool = False


@dataclass
class ConnectionReport:
    """One TCP connection: negotiation, key exchange, both directions, problems."""

    index: int
    client: str
    server: str
    first_packet: int
    last_packet: int = 0
    packets: int = 0
    handshake: str = "none"  # "complete" / "syn-only" / "none"
    syn_eno: EnoReport | None = None
    synack_eno: EnoReport | None = None
    ack_eno: bool | None = None  # did the active opener's first non-SYN segment carry ENO
    status: str = "unknown"  # "encrypted" / "plain" / "unknown"
    reason: str = ""
    role_a: str | None = None  # "client" / "server"
    tep: int | None = None
    tep_name: str | None = None
    tep_byte: int | None = None
    resumed: bool = False
    resume_id: str | None = None
    nonce_a: str | None = None
    nonce_b: str | None = None
    original_a: str | None = None  # resumed: which side was A when ss[0] was made
    init1: InitReport | None = None
    init2: InitReport | None = None
    aead: int | None = None
    aead_name: str | None = None
    key_source: str | None = None
    key_problem: str | None = None
    session_id: str | None = None
    directions: list[DirectionReport] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    problems_suppressed: int = 0


@dataclass
class DecodeReport:
    """Everything `decode` found in one capture."""

    file: str
    format: str = "unknown"
    linktypes: list[int] = field(default_factory=list)
    packets: int = 0
    tcp_packets: int = 0
    keylog: str | None = None
    connections: list[ConnectionReport] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    schema: str = SCHEMA

    @property
    def problem_count(self) -> int:
        """Problems in the file and in every connection (suppressed ones included)."""
        return len(self.problems) + sum(len(c.problems) + c.problems_suppressed for c in self.connections)


# ------------------------------------------------------------------------------ helpers


def _eno_report(option: EnoOption) -> EnoReport:
    subs = []
    for sub in option.teps:
        half = nonce = None
        if sub.v and len(sub.data) >= RESUME_HALF:
            half, nonce = sub.data[:RESUME_HALF].hex(), sub.data[RESUME_HALF:].hex()
        name = TEP_NAMES.get(sub.tep)  # type: ignore[call-overload]
        subs.append(SuboptionReport(sub.byte, sub.tep, name, sub.v, sub.data.hex(), half, nonce))
    return EnoReport(option.raw.hex(), option.global_byte, option.b, option.a, subs)


def _printable_ratio(sample: bytes | bytearray) -> float | None:
    if not sample:
        return None
    return round(1 - len(bytes(sample).translate(None, _PRINTABLE)) / len(sample), 3)


# ------------------------------------------------------------------------------ one direction


class _Direction:
    """The framing-stream walker of one sender (RFC 8548 §4.1, §4.2)."""

    def __init__(self, conn: _Connection, side: str, sender: str, receiver: str) -> None:
        self.conn = conn
        self.report = DirectionReport(side, sender, receiver)
        self.side = side
        self.mode = "none"  # none / init / frames / resync / raw / lost
        self.init_magic = 0
        self.reasm: StreamReassembler | None = None
        self.buf = bytearray()
        self.buf_offset = 0  # stream offset of buf[0]
        self.pos = 0
        self.marks: list[tuple[int, int]] = []  # (offset, packet) of delivered chunks in buf
        self.sample = bytearray()
        self.sha = hashlib.sha256()
        self.out: BinaryIO | None = None
        self.pending: list[tuple[int, int, bytes, int]] = []
        self.pending_bytes = 0
        self.cipher: FrameCipher | None = None
        self.key_name = ""  # "k_ab" / "k_ba"
        self.schedule: KeySchedule | None = None
        self.generation = 0
        self.complete = True  # every byte of the stream was accounted for as plaintext
        self.early: list[tuple[int, bytes, int]] = []  # data before the negotiation was decided

    # -- plumbing from the reassembler

    def start(self, isn: int | None) -> None:
        if self.reasm is None:
            self.reasm = StreamReassembler(self._data, self._gap, isn, on_conflict=self._differs)
            self.report.isn = isn
            self.report.offsets_exact = isn is not None

    def _packet_at(self, offset: int) -> int | None:
        found = None
        for start, packet in self.marks:
            if start > offset:
                break
            found = packet
        return found

    def problem(self, kind: str, message: str, offset: int | None = None, packet: int | None = None) -> None:
        if packet is None and offset is not None:
            packet = self._packet_at(offset)
        self.conn.problem(kind, message, packet, self.side, offset)

    def reasm_ack(self, ack: int) -> None:
        """An acknowledgment number the receiver sent for this stream."""
        if self.reasm is not None:
            self.reasm.ack(ack)

    def _data(self, offset: int, data: bytes, packet: int) -> None:
        rep = self.report
        rep.stream_bytes += len(data)
        if len(self.sample) < SAMPLE_LEN:
            self.sample += data[: SAMPLE_LEN - len(self.sample)]
        if self.mode == "none":
            self.early.append((offset, data, packet))
        else:
            self._consume(offset, data, packet)

    def _consume(self, offset: int, data: bytes, packet: int) -> None:
        mode = self.mode
        if mode == "raw":
            self._plaintext(data)
            return
        if mode == "lost":
            self.report.unparsed_bytes += len(data)
            return
        if not self.buf:
            self.buf_offset = offset
            self.pos = 0
            self.marks.clear()
        self.marks.append((offset, packet))
        self.buf += data
        self._parse()

    def _differs(self, offset: int, length: int, packet: int) -> None:
        self.conn.problem(
            "retransmission-differs",
            f"{length} bytes at offset {offset} differ from what was sent there before (forged or broken)",
            packet, self.side, offset,
        )

    def _gap(self, gap: Gap) -> None:
        self.report.gaps.append({"offset": gap.offset, "length": gap.length, "packet": gap.packet})
        where = f"before packet {gap.packet}" if gap.packet else "at the end of the capture"
        self.conn.problem("gap", f"{gap.length} bytes missing from the capture at offset {gap.offset} ({where})",
                          gap.packet or None, self.side, gap.offset)
        self.complete = False
        if self.mode == "none":
            self.early.append((gap.offset, b"", -gap.length))  # replayed as a gap after the decision
            return
        self._break(gap)

    def _break(self, gap: Gap) -> None:
        """The framing walk meets a gap: drop the partial message, look for a frame boundary after it."""
        if self.mode in ("raw", "lost"):
            return
        left = len(self.buf) - self.pos
        if self.mode == "init":
            where = self.buf_offset + self.pos
            self.problem("init-lost", "the init message is incomplete: its bytes are in a gap", where)
            self.conn.init_lost(self)
        elif left:
            self.problem("frame-lost", f"frame at offset {self.buf_offset + self.pos} is cut by the gap",
                         self.buf_offset + self.pos)
        self.report.unparsed_bytes += left
        self.buf.clear()
        self.marks.clear()
        self.pos = 0
        self.mode = "resync"

    # -- the framing stream

    def begin(self, mode: str, magic: int = 0) -> None:
        """Start walking: "init" (Init message then frames), "frames" (resumed) or "raw" (plain TCP)."""
        self.mode = mode
        self.init_magic = magic
        self.report.framing = {"init": "init+frames", "frames": "frames", "raw": "raw"}[mode]
        if mode != "raw":
            self.report.framing_valid = True
        early, self.early = self.early, []
        for offset, data, packet in early:
            if packet < 0:
                self._break(Gap(offset, -packet, 0))
            else:
                self._consume(offset, data, packet)

    def _lose_framing(self, kind: str, message: str, offset: int) -> None:
        self.problem(kind, message, offset)
        self.report.framing_valid = False
        self.complete = False
        self.report.unparsed_bytes += len(self.buf) - self.pos
        self.buf.clear()
        self.marks.clear()
        self.pos = 0
        self.mode = "resync"

    def _parse(self) -> None:
        buf = self.buf
        while True:
            pos = self.pos
            avail = len(buf) - pos
            mode = self.mode
            if mode == "frames":
                if avail < FRAME_HEADER_LEN:
                    break
                control, clen = unpack_frame_header(buf, pos)
                offset = self.buf_offset + pos
                if clen < MIN_CLEN:
                    self._lose_framing("bad-frame", f"frame at offset {offset} has clen {clen} < {MIN_CLEN}", offset)
                    return
                size = FRAME_HEADER_LEN + clen
                if avail < size:
                    break
                self.pos = pos + size
                self._frame(offset, control, bytes(buf[pos : pos + size]))
            elif mode == "init":
                if avail < 8:
                    break
                offset = self.buf_offset + pos
                name = "init1" if self.init_magic == INIT1_MAGIC else "init2"
                try:
                    length = init_message_length(bytes(buf[pos : pos + 8]), self.init_magic)
                except MalformedSegment as exc:
                    self.conn.init_lost(self)
                    self._lose_framing("malformed-init", f"{name}: {exc}", offset)
                    return
                assert length is not None
                if not 8 <= length <= MAX_INIT_LEN:
                    self.conn.init_lost(self)
                    self._lose_framing("malformed-init", f"{name} message_len {length} out of range", offset)
                    return
                if avail < length:
                    break
                self.pos = pos + length
                self.mode = "frames"
                self.conn.init_message(self, bytes(buf[pos : pos + length]), self._packet_at(offset))
            elif mode == "resync":
                if not self._resync():
                    break
            else:
                return
        if self.pos > (1 << 20) and self.pos * 2 > len(buf):
            self._compact()

    def _compact(self) -> None:
        del self.buf[: self.pos]
        self.buf_offset += self.pos
        self.pos = 0
        keep = [m for m in self.marks if m[0] >= self.buf_offset]
        older = [m for m in self.marks if m[0] < self.buf_offset]
        self.marks = older[-1:] + keep

    def _resync(self) -> bool:
        """After a gap or broken framing: find the next frame boundary at a packet start."""
        buf = self.buf
        while self.marks:
            start, _packet = self.marks[0]
            at = start - self.buf_offset
            if at < self.pos:
                self.marks.pop(0)
                continue
            if len(buf) - at < FRAME_HEADER_LEN:
                return False
            control, clen = unpack_frame_header(buf, at)
            accepted = False
            if control_known(control) and clen >= MIN_CLEN:
                end = at + FRAME_HEADER_LEN + clen
                if len(buf) < end:
                    if len(buf) - at <= RESYNC_WINDOW:
                        return False
                elif self.cipher is not None and self.conn.keys == "ready":
                    accepted = self._opens(start, control, bytes(buf[at:end]))
                elif end == len(buf):
                    accepted = True
                elif len(buf) - end < FRAME_HEADER_LEN:
                    return False
                else:
                    c2, l2 = unpack_frame_header(buf, end)
                    accepted = control_known(c2) and l2 >= MIN_CLEN
            if accepted:
                self.report.unparsed_bytes += at - self.pos
                self.pos = at
                self.mode = "frames"
                self.problem("resynchronized", f"framing picked up again at offset {start}", start)
                return True
            self.marks.pop(0)
        self.report.unparsed_bytes += len(buf) - self.pos
        self.buf.clear()
        self.pos = 0
        return False

    def _opens(self, offset: int, control: int, frame: bytes) -> bool:
        cipher = self._cipher_for(self.generation + 1) if is_rekey(control) else self.cipher
        if cipher is None:
            return False
        try:
            cipher.open(offset, frame)
        except IntegrityError:
            return False
        return True

    def _frame(self, offset: int, control: int, frame: bytes) -> None:
        rep = self.report
        rep.frames += 1
        clen = len(frame) - FRAME_HEADER_LEN
        rep.frame_bytes += len(frame)
        if rep.clen_min is None or clen < rep.clen_min:
            rep.clen_min = clen
        if rep.clen_max is None or clen > rep.clen_max:
            rep.clen_max = clen
        if is_rekey(control):
            rep.rekeys.append(offset)
        if not control_known(control):
            self.problem("reserved-bits", f"frame at offset {offset} has reserved control bits {control:#04x}", offset)
        keys = self.conn.keys
        if keys == "pending":
            if self.pending_bytes + len(frame) <= PENDING_LIMIT:
                self.pending.append((offset, control, frame, self._packet_at(offset) or 0))
                self.pending_bytes += len(frame)
                return
            keys = "none"
        if keys == "ready":
            self._open(offset, control, frame, None)
        else:
            rep.undecrypted += 1
            self.complete = False

    def flush_pending(self) -> None:
        """Keys are decided: open (or count) the frames that waited for them."""
        pending, self.pending = self.pending, []
        self.pending_bytes = 0
        for offset, control, frame, packet in pending:
            if self.conn.keys == "ready":
                self._open(offset, control, frame, packet)
            else:
                self.report.undecrypted += 1
                self.complete = False

    def set_keys(self, schedule: KeySchedule, key_name: str, aead: Aead) -> None:
        self.schedule = schedule
        self.key_name = key_name
        self._aead = aead
        self.generation = 0
        self.cipher = FrameCipher(aead, getattr(schedule.keys(0), key_name))

    def _cipher_for(self, generation: int) -> FrameCipher | None:
        if self.schedule is None:
            return None
        return FrameCipher(self._aead, getattr(self.schedule.keys(generation), self.key_name))

    def _open(self, offset: int, control: int, frame: bytes, packet: int | None) -> None:
        rep = self.report
        if self.cipher is None:  # resumed session: the AEAD is found by trial on the first frame
            if not self.conn.find_aead(self, offset, frame):
                rep.undecrypted += 1
                self.complete = False
                return
        assert self.cipher is not None
        cipher = self.cipher
        next_cipher = None
        if is_rekey(control):
            # RFC 8548 §3.8: the first frame of the next key generation for this direction
            next_cipher = self._cipher_for(self.generation + 1)
            cipher = next_cipher or cipher
        try:
            plaintext = cipher.open(offset, frame)
        except IntegrityError:
            rep.failed += 1
            self.complete = False
            self.problem("tag-failure", f"frame at offset {offset} (clen {len(frame) - 3}) failed authentication",
                         offset, packet)
            return
        if next_cipher is not None:
            self.generation += 1
            self.cipher = next_cipher
        rep.verified += 1
        if rep.finp_offset is not None:
            self.problem("data-after-finp", f"frame at offset {offset} follows the FINp frame", offset, packet)
        data, finp = frame_data(plaintext)
        if finp and rep.finp_offset is None:
            rep.finp_offset = offset
        if frame_urgent(plaintext):
            rep.urgent_frames += 1
        if data:
            self._plaintext(data)

    def _plaintext(self, data: bytes) -> None:
        self.report.plaintext_bytes += len(data)
        self.sha.update(data)
        if self.out is not None:
            self.out.write(data)

    def finish(self) -> None:
        """End of capture: close the stream, count what is left, fill in the summary."""
        if self.reasm is not None:
            self.reasm.finish()
            self.report.repeated_bytes = self.reasm.repeated_bytes
            self.report.fin_offset = self.reasm.fin_offset
        if self.mode == "none" and self.early:
            self.begin("raw")
        rep = self.report
        left = len(self.buf) - self.pos
        if left and self.mode in ("frames", "init"):
            rep.trailing_bytes = left
            self.complete = False
            what = "init message" if self.mode == "init" else "frame"
            self.problem("truncated-" + ("init" if self.mode == "init" else "frame"),
                         f"the capture ends inside a {what}: {left} bytes at offset {self.buf_offset + self.pos}",
                         self.buf_offset + self.pos)
            if self.mode == "init":
                self.conn.init_lost(self)
        elif left:
            rep.unparsed_bytes += left
        self.flush_pending()
        if rep.framing in ("init+frames", "frames") and rep.unparsed_bytes:
            rep.framing_valid = False
        rep.printable_ratio = _printable_ratio(self.sample)
        if rep.framing in ("raw", "none"):
            rep.could_be_plaintext = rep.stream_bytes > 0
        else:
            rep.could_be_plaintext = rep.unparsed_bytes > 0
        if rep.plaintext_bytes or rep.verified or rep.framing == "raw":
            rep.plaintext_sha256 = self.sha.hexdigest()
            rep.plaintext_complete = self.complete and rep.failed == 0 and rep.undecrypted == 0
        fin_without_finp = rep.fin_offset is not None and rep.finp_offset is None
        if self.conn.keys == "ready" and fin_without_finp and rep.framing != "raw":
            self.problem("fin-without-finp", "tcp FIN without a FINp frame (truncation?)", rep.fin_offset)
        if self.out is not None:
            self.out.close()


# ------------------------------------------------------------------------------ one connection


class _Connection:
    """The state of one TCP connection while the capture is read."""

    def __init__(self, decoder: _Decoder, index: int, client: tuple[bytes, int], server: tuple[bytes, int],
                 packet: int) -> None:
        self.decoder = decoder
        self.client = client
        self.server = server
        self.report = ConnectionReport(index, format_endpoint(*client), format_endpoint(*server), packet)
        c, s = self.report.client, self.report.server
        self.dirs = {"client": _Direction(self, "client", c, s), "server": _Direction(self, "server", s, c)}
        self.syn_isn: int | None = None
        self.synack_isn: int | None = None
        self.syn_eno: EnoOption | None = None
        self.synack_eno: EnoOption | None = None
        self.syn_eno_error = False
        self.decided = False
        self.keys = "pending"  # pending / ready / none
        self.init_raw: dict[str, bytes] = {}
        self.init1 = None
        self.init2 = None
        self.role_of: dict[str, str] = {}
        self.resume: tuple[bytes, bytes] | None = None  # (resume id, ss)
        self.sn = b""
        self.closed = False

    def problem(self, kind: str, message: str, packet: int | None = None, side: str | None = None,
                offset: int | None = None) -> None:
        rep = self.report
        if len(rep.problems) >= MAX_PROBLEMS:
            rep.problems_suppressed += 1
            return
        rep.problems.append(Problem(kind, message, packet, side, offset))

    # -- packets

    def packet(self, seg: Segment, number: int) -> None:
        rep = self.report
        rep.packets += 1
        rep.last_packet = number
        side = "client" if (seg.src, seg.sport) == self.client else "server"
        direction = self.dirs[side]
        eno_raw = None
        try:
            options = parse_options(seg.options)
            enos = [raw for kind, raw in options if kind == ENO_OPTION_KIND]
            if len(enos) > 1:
                self.problem("duplicate-eno", f"{len(enos)} ENO options in one segment", number, side)
            eno_raw = enos[0] if enos else None
        except MalformedSegment as exc:
            self.problem("malformed-options", str(exc), number, side)
        if seg.flags & TCP_RST:
            direction.report.rst = True
        if seg.flags & TCP_SYN:
            self._syn(seg, number, side, eno_raw)
            if seg.payload:
                self.problem("syn-data", f"{len(seg.payload)} bytes of data in a SYN (ignored)", number, side)
            if seg.flags & TCP_ACK:
                self.dirs["client" if side == "server" else "server"].reasm_ack(seg.ack)
            return
        if not self.decided:
            if side == "client" and self.synack_eno is not None and self.syn_eno is not None:
                self.report.ack_eno = eno_raw is not None
            self.decide()
        direction.start(None)
        assert direction.reasm is not None
        if seg.flags & TCP_ACK:
            self.dirs["server" if side == "client" else "client"].reasm_ack(seg.ack)
        if seg.payload or seg.flags & TCP_FIN:
            direction.reasm.add(seg.seq, seg.payload, number, bool(seg.flags & TCP_FIN))
        if seg.flags & (TCP_FIN | TCP_RST):
            self.closed = True

    def _syn(self, seg: Segment, number: int, side: str, eno_raw: bytes | None) -> None:
        option = None
        if eno_raw is not None:
            try:
                option = parse_eno(eno_raw)
            except MalformedSegment as exc:
                self.problem("malformed-eno", f"{exc} (option {eno_raw.hex()}): the SYN counts as having no ENO",
                             number, side)
        is_synack = bool(seg.flags & TCP_ACK)
        if not is_synack and side == "client":
            if self.syn_isn is None:
                self.syn_isn = seg.seq
                self.syn_eno = option
                self.syn_eno_error = eno_raw is not None and option is None
                self.report.syn_eno = _eno_report(option) if option else None
                self.dirs["client"].start(seg.seq)
                self.report.handshake = "syn-only"
            elif option is not None and self.syn_eno is not None and option.raw != self.syn_eno.raw:
                self.problem("eno-changed", "a retransmitted SYN carries a different ENO option", number, side)
        elif is_synack and side == "server":
            if self.synack_isn is None:
                self.synack_isn = seg.seq
                self.synack_eno = option
                self.report.synack_eno = _eno_report(option) if option else None
                self.dirs["server"].start(seg.seq)
                self.report.handshake = "complete" if self.syn_isn is not None else "syn-ack-only"
        else:
            self.problem("unexpected-syn", "SYN in an unexpected direction (simultaneous open is not decoded)",
                         number, side)

    # -- negotiation (RFC 8547 §4.5, §6; RFC 8548 §3.2, §3.5)

    def decide(self) -> None:
        """Fix the outcome of the handshake and start both framing walkers."""
        if self.decided:
            return
        self.decided = True
        rep = self.report
        status, reason = self._negotiate()
        rep.status, rep.reason = status, reason
        if status != "encrypted":
            self.keys = "none"
            for d in self.dirs.values():
                d.begin("raw")
            return
        roles = self.role_of
        for side, d in self.dirs.items():
            d.report.role = roles[side]
        if rep.resumed:
            self._resumed_keys()
            for d in self.dirs.values():
                d.begin("frames")
        else:
            for side, d in self.dirs.items():
                d.begin("init", INIT1_MAGIC if roles[side] == "A" else INIT2_MAGIC)

    def _negotiate(self) -> tuple[str, str]:
        rep = self.report
        if self.syn_isn is None or self.synack_isn is None:
            return "unknown", "the capture does not hold the SYN and SYN-ACK: negotiation unknown"
        syn, synack = self.syn_eno, self.synack_eno
        if syn is None:
            reason = "the SYN carries no valid ENO option" if self.syn_eno_error else "the SYN carries no ENO option"
            return "plain", reason
        if synack is None:
            return "plain", "the SYN-ACK carries no ENO option (the server does not speak TCP-ENO or declined)"
        if syn.b == synack.b:
            return "plain", f"both SYN ENO options have b={int(syn.b)} (incompatible global suboptions)"
        a_side, b_side = ("client", "server") if not syn.b else ("server", "client")
        self.role_of = {a_side: "A", b_side: "B"}
        rep.role_a = a_side
        opt_a, opt_b = (syn, synack) if a_side == "client" else (synack, syn)
        # RFC 8547 §4.5: the last valid TEP in B's option; a repeated TEP is not valid for tcpcrypt.
        valid = unrepeated_teps(opt_a) & unrepeated_teps(opt_b)
        chosen = next((sub for sub in reversed(opt_b.teps) if sub.tep in valid), None)
        if chosen is None:
            return "plain", "no TEP is offered by both sides: ENO disabled"
        rep.tep, rep.tep_byte = chosen.tep, chosen.byte
        rep.tep_name = TEP_NAMES.get(chosen.tep)  # type: ignore[call-overload]
        if chosen.tep not in set(Tep):
            return "unknown", f"negotiated TEP {chosen.tep:#04x} is not tcpcrypt: cannot decode"
        if rep.ack_eno is False:
            return "plain", "the active opener's first ACK carries no ENO option (RFC 8547 §4.6): ENO disabled"
        a_sub = next(s for s in opt_a.teps if s.tep == chosen.tep)
        if chosen.v and len(chosen.data) >= RESUME_HALF and a_sub.v and len(a_sub.data) >= RESUME_HALF:
            rep.resumed = True
            return "encrypted", f"resumed session with TEP {rep.tep_name}"
        return "encrypted", f"fresh key exchange with TEP {rep.tep_name}"

    # -- keys

    def _resumed_keys(self) -> None:
        rep = self.report
        syn, synack = self.syn_eno, self.synack_eno
        assert syn is not None and synack is not None and rep.tep is not None
        subs = {
            "client": next(s for s in syn.teps if s.tep == rep.tep),
            "server": next(s for s in synack.teps if s.tep == rep.tep),
        }
        halves = {side: s.data[:RESUME_HALF] for side, s in subs.items()}
        nonces = {side: s.data[RESUME_HALF:] for side, s in subs.items()}
        keylog = self.decoder.keylog
        found = keylog.find_resumed(halves["client"], halves["server"]) if keylog else None
        if found is None:
            rep.nonce_a = rep.nonce_b = None
            self._no_keys("no key log" if keylog is None else "resume identifier not in the key log")
            return
        rid, ss = found
        original_a = "client" if halves["client"] == rid[:RESUME_HALF] else "server"
        original_b = "server" if original_a == "client" else "client"
        rep.resume_id, rep.original_a = rid.hex(), original_a
        rep.nonce_a, rep.nonce_b = nonces[original_a].hex(), nonces[original_b].hex()
        self.sn = nonces[original_a] + nonces[original_b]
        self.resume = found
        rep.key_source = "key log (resumption secret)"
        keylog.add_chain(ss)
        self.keys = "ready"  # the AEAD is found by trial on the first frame (docs/protocol.md T3)

    def find_aead(self, direction: _Direction, offset: int, frame: bytes) -> bool:
        """Resumed session: find the AEAD of the original session by opening the first frame."""
        rep = self.report
        if rep.aead is not None or self.resume is None:
            return False
        assert rep.tep_byte is not None
        _rid, ss = self.resume
        for aead in Aead:
            schedule = KeySchedule(ss, self.sn, rep.tep_byte, traffic_key_len(aead))
            key_name = "k_ab" if direction.side == rep.original_a else "k_ba"
            try:
                FrameCipher(aead, getattr(schedule.keys(0), key_name)).open(offset, frame)
            except IntegrityError:
                continue
            rep.aead, rep.aead_name = int(aead), AEAD_NAMES[aead]
            rep.session_id = schedule.session_id.hex()
            for d in self.dirs.values():
                name = "k_ab" if d.side == rep.original_a else "k_ba"
                d.set_keys(KeySchedule(ss, self.sn, rep.tep_byte, traffic_key_len(aead)), name, aead)
            return True
        direction.problem("tag-failure", f"first frame at offset {offset} opens under no AEAD with the resumed secret",
                          offset)
        return False

    def init_lost(self, direction: _Direction) -> None:
        if self.keys == "pending":
            self._no_keys(f"the {direction.side}'s init message could not be read")

    def _no_keys(self, why: str) -> None:
        self.keys = "none"
        if self.report.key_problem is None:
            self.report.key_problem = why
        for d in self.dirs.values():
            d.flush_pending()

    def init_message(self, direction: _Direction, raw: bytes, packet: int | None) -> None:
        """An Init1/Init2 was read whole at the start of `direction`'s stream (RFC 8548 §4.1)."""
        rep = self.report
        assert rep.tep is not None
        tep = Tep(rep.tep)
        is_init1 = direction.init_magic == INIT1_MAGIC
        try:
            if is_init1:
                msg1 = parse_init1(raw, tep)
                self.init1 = msg1
                rep.init1 = InitReport("init1", len(raw), packet, list(msg1.sym_ciphers), msg1.n_a.hex(),
                                       msg1.pk_a.hex(), len(msg1.ignored))
            else:
                msg2 = parse_init2(raw, tep)
                self.init2 = msg2
                rep.init2 = InitReport("init2", len(raw), packet, [msg2.sym_cipher], msg2.n_b.hex(),
                                       msg2.pk_b.hex(), len(msg2.ignored))
        except MalformedSegment as exc:
            direction.problem("malformed-init", f"{'init1' if is_init1 else 'init2'}: {exc}", 0, packet)
            direction.report.framing_valid = False
            self.init_lost(direction)
            return
        self.init_raw["init1" if is_init1 else "init2"] = raw
        if self.init1 is None or self.init2 is None:
            return
        self._fresh_keys(packet)

    def _fresh_keys(self, packet: int | None) -> None:
        rep = self.report
        init1, init2 = self.init1, self.init2
        assert init1 is not None and init2 is not None
        if init2.sym_cipher not in init1.sym_ciphers:
            self.problem("aead-not-offered", f"init2 chose aead {init2.sym_cipher:#06x}, not offered in init1", packet)
        try:
            aead = Aead(init2.sym_cipher)
        except ValueError:
            self._no_keys(f"unknown aead {init2.sym_cipher:#06x}")
            return
        rep.aead, rep.aead_name = int(aead), AEAD_NAMES[aead]
        keylog = self.decoder.keylog
        if keylog is None:
            self._no_keys("no key log")
            return
        es = keylog.es.get(init1.n_a)
        if es is None:
            self._no_keys("N_A not in the key log")
            return
        assert self.syn_eno is not None and self.synack_eno is not None and rep.tep_byte is not None
        opt_a, opt_b = (self.syn_eno, self.synack_eno) if rep.role_a == "client" else (self.synack_eno, self.syn_eno)
        ss = session_secret(init1.n_a, opt_a.raw + opt_b.raw, self.init_raw["init1"], self.init_raw["init2"], es)
        keylog.add_chain(ss)
        schedule = KeySchedule(ss, b"", rep.tep_byte, traffic_key_len(aead))
        rep.session_id = schedule.session_id.hex()
        rep.key_source = "key log (ES)"
        for side, d in self.dirs.items():
            name = "k_ab" if self.role_of[side] == "A" else "k_ba"
            d.set_keys(KeySchedule(ss, b"", rep.tep_byte, traffic_key_len(aead)), name, aead)
        self.keys = "ready"
        for d in self.dirs.values():
            d.flush_pending()

    def finish(self) -> ConnectionReport:
        if not self.decided:
            self.decide()
        for d in self.dirs.values():
            d.finish()
        if self.keys == "pending":
            self._no_keys("the key exchange is not complete in the capture")
            for d in self.dirs.values():
                d.report.plaintext_complete = False
        rep = self.report
        rep.directions = [self.dirs["client"].report, self.dirs["server"].report]
        if rep.status == "encrypted" and not rep.resumed and (rep.init1 is None or rep.init2 is None):
            missing = [m for m, r in (("init1", rep.init1), ("init2", rep.init2)) if r is None]
            if not rep.key_problem:
                rep.key_problem = f"{' and '.join(missing)} not in the capture"
        return rep


# ------------------------------------------------------------------------------ the capture


class _Decoder:
    def __init__(self, keylog: KeyLog | None, write_plaintext: str | None) -> None:
        self.keylog = keylog
        self.write_plaintext = write_plaintext
        self.live: dict[tuple[Any, ...], _Connection] = {}
        self.done: list[_Connection] = []
        self.count = 0

    def _new(self, client: tuple[bytes, int], server: tuple[bytes, int], number: int) -> _Connection:
        self.count += 1
        conn = _Connection(self, self.count, client, server, number)
        if self.write_plaintext:
            for side, d in conn.dirs.items():
                name = f"conn{conn.report.index}-{side}-{d.report.sender}.bin"
                name = name.replace(":", "_").replace("[", "").replace("]", "")
                path = os.path.join(self.write_plaintext, name)
                d.out = open(path, "wb")  # noqa: SIM115 - closed in finish()
                d.report.plaintext_file = path
        return conn

    def segment(self, seg: Segment, number: int) -> None:
        here, there = (seg.src, seg.sport), (seg.dst, seg.dport)
        key = (here, there) if here <= there else (there, here)
        conn = self.live.get(key)
        is_syn = seg.flags & TCP_SYN and not seg.flags & TCP_ACK
        if conn is not None and is_syn and conn.syn_isn is not None and seg.seq != conn.syn_isn:
            self.done.append(conn)  # a new connection on the same 4-tuple
            conn = None
        if conn is None:
            if seg.flags & TCP_SYN and seg.flags & TCP_ACK:
                client, server = there, here
            elif is_syn:
                client, server = here, there
            else:  # mid-connection: guess the server by the lower port
                client, server = (here, there) if seg.sport >= seg.dport else (there, here)
            conn = self._new(client, server, number)
            self.live[key] = conn
        conn.packet(seg, number)


def decode_pcap(path: str, keylog: str | KeyLog | None = None, write_plaintext: str | None = None) -> DecodeReport:
    """Decode every TCP connection of the capture at `path` (see the module docstring)."""
    report = DecodeReport(file=str(path))
    log: KeyLog | None
    if isinstance(keylog, str):
        log = load_keylog(keylog)
        report.keylog = keylog
        report.problems += [Problem("keylog", message) for message in log.problems]
    else:
        log = keylog
    if write_plaintext:
        os.makedirs(write_plaintext, exist_ok=True)
    decoder = _Decoder(log, write_plaintext)
    try:
        reader = CaptureReader(str(path))
    except OSError as exc:
        report.problems.append(Problem("unreadable", f"cannot open {path}: {exc.strerror or exc}", 0))
        return report
    with reader:
        for record in reader:
            report.packets += 1
            ip, problem = ip_packet(record)
            if problem is not None:
                report.problems.append(Problem(problem.kind, problem.message, problem.packet))
            if ip is None:
                continue
            try:
                seg = parse_segment(ip)
            except MalformedSegment as exc:
                report.problems.append(Problem("malformed-packet", str(exc), record.number))
                continue
            report.tcp_packets += 1
            try:
                decoder.segment(seg, record.number)
            except Exception as exc:  # noqa: BLE001 - a bad capture must never stop the decode
                report.problems.append(Problem("internal-error", f"{type(exc).__name__}: {exc}", record.number))
        report.format = reader.format
        report.linktypes = sorted(reader.linktypes)
        report.problems += [Problem(p.kind, p.message, p.packet or None) for p in reader.problems]
    conns = decoder.done + list(decoder.live.values())
    for conn in sorted(conns, key=lambda c: c.report.index):
        try:
            report.connections.append(conn.finish())
        except Exception as exc:  # noqa: BLE001
            report.problems.append(Problem("internal-error", f"connection {conn.report.index}: "
                                           f"{type(exc).__name__}: {exc}"))
            report.connections.append(conn.report)
    return report


# ------------------------------------------------------------------------------ rendering


def to_json(report: DecodeReport) -> dict[str, Any]:
    """The report as plain JSON data (schema in decode_schema.md)."""
    data = dataclasses.asdict(report)
    data["problem_count"] = report.problem_count
    return data


def render_json(report: DecodeReport) -> str:
    """The report as a JSON document."""
    return json.dumps(to_json(report), indent=2)


def _eno_text(eno: EnoReport | None) -> str:
    if eno is None:
        return "none"
    glob = "implicit 00" if eno.global_byte is None else f"{eno.global_byte:02x}"
    subs = []
    for s in eno.suboptions:
        text = f"{s.byte:02x}({s.name or 'unknown'}{', v=1' if s.v else ''}"
        if s.resume_half is not None:
            text += f", resume half {s.resume_half}, nonce {s.nonce or '-'}"
        elif s.data:
            text += f", data {s.data}"
        subs.append(text + ")")
    return f"{eno.raw}  global {glob} (b={int(eno.b)} a={int(eno.a)})  TEPs: {', '.join(subs) or 'none (vacuous)'}"


def _name(value: int | None, names: dict[Any, str]) -> str:
    if value is None:
        return "-"
    return f"{names.get(value, 'unknown')} ({value:#06x})"


def render_text(report: DecodeReport) -> str:
    """The report for a terminal."""
    lines = [f"{report.file}: {report.format}, link types {report.linktypes}, {report.packets} packets "
             f"({report.tcp_packets} TCP), {len(report.connections)} connection(s)"]
    if report.keylog:
        lines.append(f"key log: {report.keylog}")
    for p in report.problems:
        lines.append(f"  ! {p.kind}{f' (packet {p.packet})' if p.packet else ''}: {p.message}")
    for c in report.connections:
        lines.append("")
        lines += _connection_text(c)
    lines.append("")
    lines.append(f"{report.problem_count} problem(s)")
    return "\n".join(lines)


def _connection_text(c: ConnectionReport) -> list[str]:
    lines = [f"connection {c.index}: {c.client} -> {c.server}  packets {c.first_packet}-{c.last_packet} "
             f"({c.packets}), handshake {c.handshake}",
             f"  SYN ENO:     {_eno_text(c.syn_eno)}",
             f"  SYN-ACK ENO: {_eno_text(c.synack_eno)}"]
    if c.ack_eno is not None:
        lines.append(f"  first ACK ENO: {'yes' if c.ack_eno else 'no'}")
    lines.append(f"  status: {c.status.upper()} - {c.reason}")
    if c.status == "encrypted":
        lines += _keys_text(c)
    for d in c.directions:
        lines += _direction_text(d, bool(c.session_id))
    for p in c.problems:
        where = []
        if p.side:
            where.append(p.side)
        if p.offset is not None:
            where.append(f"offset {p.offset}")
        if p.packet:
            where.append(f"packet {p.packet}")
        lines.append(f"  ! {p.kind} [{', '.join(where)}]: {p.message}")
    if c.problems_suppressed:
        lines.append(f"  ! ... and {c.problems_suppressed} more problems")
    return lines


def _keys_text(c: ConnectionReport) -> list[str]:
    """Roles, Init messages, AEAD and session ID of an encrypted connection."""
    lines = [f"  roles: A = {c.role_a}, B = {'server' if c.role_a == 'client' else 'client'}; "
             f"TEP byte {c.tep_byte:02x}; {'resumed' if c.resumed else 'fresh'}"]
    if c.resumed:
        lines.append(f"  resume id {c.resume_id or '?'} (original A = {c.original_a or '?'}), "
                     f"nonce_a {c.nonce_a or '?'}, nonce_b {c.nonce_b or '?'}")
    for init in (c.init1, c.init2):
        if init is not None:
            ciphers = ", ".join(_name(x, AEAD_NAMES) for x in init.sym_ciphers)
            lines.append(f"  {init.message}: {init.length} bytes (packet {init.packet}), "
                         f"ciphers [{ciphers}], nonce {init.nonce[:16]}..., key {init.public_key[:16]}..."
                         f"{f', {init.ignored_len} ignored bytes' if init.ignored_len else ''}")
    lines.append(f"  AEAD: {_name(c.aead, AEAD_NAMES)}")
    if c.session_id:
        lines.append(f"  session ID: {c.session_id}  ({c.key_source})")
    else:
        lines.append(f"  keys: none ({c.key_problem or 'no key log'})")
    return lines


def _direction_text(d: DirectionReport, keyed: bool) -> list[str]:
    """One direction's stream, framing and plaintext."""
    lines = [f"  {d.side} {d.sender} -> {d.receiver}{f' (role {d.role})' if d.role else ''}: "
             f"{d.stream_bytes} bytes"
             f"{'' if d.offsets_exact else ' (offsets relative to the first byte seen)'}"
             f"{f', {d.repeated_bytes} repeated' if d.repeated_bytes else ''}"
             f"{f', {len(d.gaps)} gap(s)' if d.gaps else ''}"
             f"{', FIN' if d.fin_offset is not None else ''}{', RST' if d.rst else ''}"]
    if d.framing in ("init+frames", "frames"):
        valid = "valid" if d.framing_valid else "INVALID"
        lines.append(f"    framing {d.framing} {valid}: {d.frames} frames, clen {d.clen_min}-{d.clen_max}, "
                     f"rekeys {len(d.rekeys)}, FINp at {d.finp_offset if d.finp_offset is not None else '-'}"
                     f"{f', {d.unparsed_bytes} bytes outside the framing' if d.unparsed_bytes else ''}"
                     f"{f', {d.trailing_bytes} trailing bytes' if d.trailing_bytes else ''}")
        if keyed:
            lines.append(f"    frames verified {d.verified}, failed {d.failed}, not decrypted {d.undecrypted}")
        else:
            lines.append("    no key: frames not verified, no plaintext")
    if d.plaintext_sha256:
        lines.append(f"    plaintext {d.plaintext_bytes} bytes sha256 {d.plaintext_sha256}"
                     f"{'' if d.plaintext_complete else ' (INCOMPLETE)'}"
                     f"{f' -> {d.plaintext_file}' if d.plaintext_file else ''}")
    if d.stream_bytes:
        verdict = "could be plaintext" if d.could_be_plaintext else "no plaintext outside the frames"
        lines.append(f"    payload: {verdict} (printable ratio {d.printable_ratio})")
    return lines


# ------------------------------------------------------------------------------ command line


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `decode` subcommand to an argparse subparsers object."""
    parser = subparsers.add_parser("decode", help="decode a capture: ENO negotiation, tcpcrypt frames, plaintext",
                                   description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("pcap", metavar="PCAP", help="capture file (pcap or pcapng)")
    parser.add_argument("--keylog", metavar="FILE", help="key log written by `run --keylog`")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (schema: tools/decode_schema.md)")
    parser.add_argument("--write-plaintext", metavar="DIR", help="write each direction's verified plaintext to DIR")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run `decode`: 0 when no problem was found, 1 when some were reported, 2 when nothing could be read."""
    try:
        report = decode_pcap(args.pcap, args.keylog, args.write_plaintext)
    except OSError as exc:
        print(f"nfq-tcpcrypt decode: {exc}", file=sys.stderr)
        return 2
    print(render_json(report) if args.json else render_text(report))
    if report.format == "unknown" and not report.packets:
        return 2
    return 1 if report.problem_count else 0
