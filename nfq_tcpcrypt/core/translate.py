"""Stream translation: one TCP stream in two byte spaces (docs/architecture.md).

The local stack sees the *plain* stream; the peer sees the *wire* stream, `[Init message] + frames`
(RFC 8548 §3.3, §3.6). A `StreamTranslator` owns a session's two streams and rewrites every packet
of an encrypting session between the two: sequence and acknowledgment numbers, SACK blocks,
windows, options and payloads; it frames new data, resends logged frames byte-identical,
reassembles and opens incoming frames, and builds the segments the engine injects. `Session`
(session.py) owns the state machine: it holds a translator, gives it the keys (`Keys`) and acts on
what each inbound packet did (`Translated`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

from .constants import (
    CONTROL_REKEY,
    ENO_OPTION_KIND,
    FRAME_HEADER_LEN,
    FRAME_OVERHEAD,
    INIT1_MAGIC,
    INIT2_MAGIC,
    MAX_INIT_LEN,
    TCP_ACK,
    TCP_FIN,
    TCP_MAX_OPTIONS,
    TCP_PSH,
    TCP_RST,
    TCP_URG,
    TCPOPT_NOP,
    TCPOPT_SACK,
    TCPOPT_SACK_PERM,
    Role,
)
from .errors import Disposition, LocalProtocolError, MalformedSegment, RemoteProtocolError, StackAnomaly
from .flow import Direction
from .seqmap import FrameRecord, RecvStream, SendStream, to_offset, to_seq
from .timers import Timer, Timers
from .verdict import DROP, Injection, Verdict, accept
from .wire.eno import NON_SYN_ENO
from .wire.ip import without_ecn
from .wire.tcp import (
    Segment,
    mss,
    new_segment,
    parse_options,
    sack_pairs,
    serialize_segment,
    timestamp,
    timestamp_option,
    usual_options,
    usual_tsval,
    window_scale,
    with_sack,
)
from .wire.tcpcrypt import frame_data, init_message_length, is_rekey

if TYPE_CHECKING:
    from .aead import FrameCipher
    from .config import Configuration
    from .flow import FlowKey
    from .outoforder import Budget

"""The first bytes of the options block Linux puts on every segment once timestamps are on."""

REPLAY_TIMEOUT: Final = 0.5
"""Seconds our stack may take to acknowledge plaintext we already acknowledged for it (its delayed
ACK is at most 0.2 s) before we hand it that plaintext again."""

SUPER_PACKET_MAX: Final = 0xFFFF - 4
"""The largest packet a verdict gives back: the kernel refuses more than 65,535 bytes, and the
netlink attribute that carries it holds 65,531 (docs/architecture.md: Sizes)."""

GSO_OPTION_ROOM: Final = 20
"""Option bytes a super-packet may carry beyond its stack's own: the kernel copies them into every
segment, and the stack sized its segments for its own options within an MSS clamped by 20 bytes
(docs/architecture.md: Sizes)."""

REPLAY_MAX_BACKOFF: Final = 16
"""The replay timer's delay grows to at most this many times REPLAY_TIMEOUT (a persist timer,
RFC 9293 §3.8.6.1: our stack may offer no window for a while)."""


class Keys(Protocol):
    """What the translator needs from the session's key exchange."""

    @property
    def keys_ready(self) -> bool:
        """Whether the traffic keys exist (the session's state says)."""
        ...

    def cipher(self, generation: int, sending: bool) -> FrameCipher:
        """The frame cipher of key set `generation` for one direction (RFC 8548 §3.8)."""
        ...

    def init_message(self, message: bytes, now: float) -> None:
        """The peer's Init message arrived whole: derive the keys (RFC 8548 §3.3); host B may
        answer with Init2 first and derive them right after (keys_ready stays False until then)."""
        ...


class _NoKeys:
    """The Keys of a translator whose session the engine forgot (`StreamTranslator.detach`):
    no traffic keys, and none to be had."""

    @property
    def keys_ready(self) -> bool:
        return False

    def cipher(self, generation: int, sending: bool) -> FrameCipher:
        raise LocalProtocolError("the session was forgotten")

    def init_message(self, message: bytes, now: float) -> None:
        raise LocalProtocolError("the session was forgotten")


_NO_KEYS: Final = _NoKeys()


class Translated:
    """A translated packet and what happened that the session acts on (a plain class: one is
    made per data packet, and a compiled dataclass's constructor is interpreted Python)."""

    def __init__(self, verdict: Verdict, peer_rekeyed: bool, closing: bool, finished: bool) -> None:
        self.verdict = verdict
        self.peer_rekeyed = peer_rekeyed  # the peer's generation moved up (RFC 8548 §3.8)
        self.closing = closing  # a FIN went one way: framed by us, or delivered to our stack
        self.finished = finished  # FIN both ways, ours acknowledged


class StreamTranslator:
    """The per-packet rewriting of an encrypting session: owns its send and receive streams, the
    header material of the segments it builds, and the replay timer."""

    def __init__(self, flow: FlowKey, config: Configuration, inject: Callable[[Injection], None],
                 timers: Timers, keys: Keys) -> None:
        self.flow = flow
        self.config = config
        self._inject = inject
        self._timers = timers
        self._keys = keys
        self.send: SendStream | None = None
        self.recv: RecvStream | None = None
        self.role: Role | None = None  # RFC 8547 §4.3
        self.need_nonsyn_eno = False  # RFC 8547 §4.6: ENO in every segment until a non-SYN arrives
        self.bytes_in = 0  # plaintext delivered to the local stack
        self.bytes_out = 0  # plaintext framed toward the peer
        self.rekeys = 0  # generations we moved to (RFC 8548 §3.8)
        self.redelivered = 0  # plaintext our stack lost, handed to it again at once (its SACK/dup ACK)
        self.replayed = 0  # plaintext handed to our stack again by the replay timer
        self.fast_data_out = 0  # segments new_data_out took (tests/core/test_fast_paths.py)
        # The largest payload plus options of a wire segment (RFC 6691): the peer's MSS option,
        # lowered by a too-big report (our own link's MTU shows up as one, sent by our kernel).
        self.wire_mss = 536
        self.local_mss: int | None = None  # our stack's SYN's MSS option (note_local_syn)
        self.pmtu: int | None = None  # the path MTU a too-big report gave, once there was one
        self.kex_tries = 0
        self.init1_sent = False
        self._sent_since_rekey = 0
        self._prefix_dupacks = 0
        self._peer_rekeyed = False  # set while draining, handed back in Translated
        self._replay_tries = 0
        self._replay_mark = 0
        self._stack_ack = 0  # the furthest plain ACK shown to our stack (_options_in, _ack_ahead)
        # Header material for the segments we build: the latest IP headers, windows, TSvals and the
        # SYN options that govern them (window scale, SACK-permitted, RFC 7323 §2.2, RFC 2018 §2).
        self.out_ip: bytes | None = None  # set by the session with every packet each way
        self.in_ip: bytes | None = None
        self.local_window = 0
        self._remote_window = 0
        self._local_ts: int | None = None
        self._remote_ts: int | None = None
        self.local_ws: int | None = None
        self.remote_ws: int | None = None
        self.local_sack_perm = False
        self.remote_sack_perm = False

    def detach(self) -> None:
        """The engine forgot the session (Session.forget): drop the reference back to it."""
        self._keys = _NO_KEYS

    @property
    def sack_ok(self) -> bool:
        """Both SYNs carried SACK-permitted (RFC 2018 §2)."""
        return self.local_sack_perm and self.remote_sack_perm

    @property
    def window_shift(self) -> int:
        """Our stack's window scale, when both SYNs carried the option (RFC 7323 §2.2)."""
        return self.local_ws if self.local_ws is not None and self.remote_ws is not None else 0

    @property
    def remote_window_shift(self) -> int:
        """The peer's window scale, when both SYNs carried the option (RFC 7323 §2.2)."""
        return self.remote_ws if self.remote_ws is not None and self.local_ws is not None else 0

    def open(self, isn_local: int, isn_remote: int, budget: Budget | None) -> None:
        """Start both streams at the SYNs' sequence numbers."""
        self.send = SendStream(isn_local)
        self.recv = RecvStream(isn_remote)
        self.recv.ooo.budget = budget

    def note_local_syn(self, options: list[tuple[int, bytes]]) -> None:
        """Our stack's SYN options: window scale, SACK-permitted, and its MSS, which bounds our
        segments as the peer's does (`note_peer_mss`)."""
        self.local_ws = window_scale(options)
        self.local_sack_perm = any(kind == TCPOPT_SACK_PERM for kind, _ in options)
        self.local_mss = mss(options)
        if self.local_mss:
            self.wire_mss = min(self.wire_mss, self.local_mss)

    def note_peer_mss(self, value: int | None) -> None:
        """The MSS option of the peer's SYN (RFC 9293 §3.7.1): the most we put in one segment, but
        never more than our own stack announced. That is its link's MTU less the headers (Linux
        announces the route's), and what we inject goes out on that link: a larger segment would
        be refused there (EMSGSIZE), as when the peer's link is 1500 bytes and ours 1400."""
        if value:
            self.wire_mss = min(value, self.local_mss or value)

    # ------------------------------------------------------------------ sending side

    def send_prefix(self, now: float) -> None:
        """(Re)send our Init message from wire offset 0, PSH on its last byte (RFC 8548 §3.3)."""
        assert self.send is not None
        self.inject_wire(0, self.send.prefix, TCP_ACK | TCP_PSH)
        self.kex_tries += 1
        self._timers.arm(Timer.KEX, now + self.config.kex_timeout * (2 ** (self.kex_tries - 1)))

    def start_rekey(self) -> None:
        """Move our local generation up; the next frame we send carries rekey = 1 (RFC 8548 §3.8)."""
        send = self.send
        assert send is not None
        send.gen += 1
        send.cipher = self._keys.cipher(send.gen, sending=True)
        send.rekey_next = True
        self.rekeys += 1
        self._sent_since_rekey = 0

    def release_held(self) -> None:
        """Frame plaintext the local stack sent before keys existed, and send it
        (docs/protocol.md: plaintext before keys)."""
        assert self.send is not None
        held, self.send.held = self.send.held, []
        for _start, data, fin in held:
            for record in self.send.new_frame(data, fin):
                self.bytes_out += record.plain_end - record.plain_start - record.fin
                self.inject_frames([record])

    def pure_ack_out(self, seg: Segment) -> Verdict | None:
        """The usual pure ACK of our stack, once keys exist: translate_out's steps for it, without
        option lists (timestamps or no options, RFC 7323 §3). None, with nothing changed, for
        anything else: the general path decides (SACK blocks or other options, out-of-order data
        held, the non-SYN ENO option due, a duplicate ACK about plaintext our stack lost)."""
        raw = seg.options
        recv, send = self.recv, self.send
        if seg.payload or not usual_options(raw) or self.need_nonsyn_eno:
            return None
        assert recv is not None and send is not None
        if recv.ooo or (self.sack_ok and recv.wire_next > recv.buf_start):
            return None  # SACK blocks to add: out-of-order data, or a frame held in order (_options_out)
        stack_ack = to_offset(seg.ack, recv.base, recv.local_ack)
        if (stack_ack < recv.plain_next - recv.fin_delivered and stack_ack == recv.local_ack
                and seg.window == self.local_window):
            return None  # a duplicate ACK: _redeliver_lost looks at it
        plain = to_offset(seg.seq, send.base, send.plain_next)
        self.local_window = window = seg.window  # note_local
        if raw:
            self._local_ts = usual_tsval(raw)
        seg.ack = to_seq(recv.ack_to_wire(stack_ack), recv.base)
        self._note_right_edge(window)
        seg.window = self._wire_window(window)
        seg.urgent = 0
        seg.seq = to_seq(send.plain_to_wire(plain), send.base)
        return accept(serialize_segment(seg), True)

    def pure_ack_in(self, seg: Segment) -> Verdict | None:
        """The peer's usual pure ACK, once keys exist and our Init message is acknowledged:
        translate_in's steps for it, without option lists (timestamps or no options). None, with
        nothing changed, for anything else (SACK blocks, a FIN either way, a keepalive probe, a
        sequence number other than the next expected one)."""
        raw = seg.options
        send, recv = self.send, self.recv
        if seg.payload or seg.gso or not usual_options(raw):
            return None
        assert send is not None and recv is not None
        if (send.acked_wire < len(send.prefix) or recv.fin_seen is not None or recv.fin_at is not None
                or recv.finp or recv.fin_delivered or send.fin_framed or self._stack_ack > send.acked_plain
                or recv.wire_next > recv.right_edge or (seg.seq - recv.base - recv.wire_next) & 0xFFFFFFFF):
            return None
        window = seg.window
        self._remote_window = window - (window >> 6)  # note_remote
        if raw:
            self._remote_ts = usual_tsval(raw)
        self._peer_rekeyed = False
        self.need_nonsyn_eno = False  # RFC 8547 §4.6: a non-SYN segment arrived
        seg.ack = to_seq(send.ack_to_plain(to_offset(seg.ack, send.base, send.acked_wire)), send.base)
        self._timers.pop(Timer.KEX, None)
        seg.window = self._plain_window(window)
        send.peer_sacks = []
        seg.urgent = 0
        # At the plain offset after what was delivered; at the first one while our stack has
        # acknowledged nothing of the peer's (translate_in: a SYN-cookie server's socket).
        seg.seq = to_seq(recv.plain_next if recv.local_ack else 0, recv.base)
        return accept(serialize_segment(seg), True)

    def new_data_out(self, seg: Segment) -> Verdict | None:
        """Our stack's usual data segment or FIN, once keys exist: the next plain bytes, all new,
        timestamps or no options (RFC 7323 §3), framed as one frame that fits the segment it
        leaves in (within the wire MSS, or a super-packet's room). translate_out's steps for it,
        without option lists or the log's lookups; None, with nothing changed, for anything else
        (a retransmission, SACK blocks to add or drop, the non-SYN ENO option due, a frame to
        split or to rekey by volume, a path MTU report, a peer's SACK blocks that may ask for a
        frame's holes)."""
        raw = seg.options
        flags = seg.flags
        n = len(seg.payload)
        send, recv = self.send, self.recv
        if ((not n and not flags & TCP_FIN) or not flags & TCP_ACK or not usual_options(raw) or self.need_nonsyn_eno
                or self.pmtu is not None or send is None or recv is None):
            return None
        if (recv.ooo or send.fin_framed or send.peer_sacks or send.cipher is None or n > self.config.frame_max
                or (seg.seq - send.base - send.plain_next) & 0xFFFFFFFF
                or (not n and self.sack_ok and recv.wire_next > recv.buf_start)  # _options_out's held block
                or not self._keys.keys_ready):
            return None
        rekey_bytes = self.config.rekey_bytes
        if rekey_bytes and self._sent_since_rekey + n > rekey_bytes and recv.gen == send.gen:
            return None  # the frame starts a new key set: the general path
        if seg.gso:
            room = SUPER_PACKET_MAX - len(seg.ip_header) - 20 - _padded(raw)
        else:
            room = self.wire_mss - _padded(raw)
        if n + FRAME_OVERHEAD > room:
            return None
        # _ack_out (no SACK blocks: nothing for _redeliver_lost) and note_local
        self.local_window = window = seg.window
        if raw:
            self._local_ts = usual_tsval(raw)
        seg.ack = to_seq(recv.ack_to_wire(to_offset(seg.ack, recv.base, recv.local_ack)), recv.base)
        self._note_right_edge(window)
        seg.window = self._wire_window(window)
        seg.urgent = 0
        # _wire_out and _send_wire
        self.bytes_out += n
        self._sent_since_rekey += n
        record = send.new_frame(seg.payload, bool(flags & TCP_FIN), self.config.frame_max)[0]
        seg.seq = to_seq(record.wire_start, send.base)
        seg.payload = record.data
        seg.flags = flags & ~TCP_URG
        if not seg.gso:
            seg.kernel_checksum = False
        return accept(serialize_segment(seg), True)

    def translate_out(self, seg: Segment, now: float) -> Verdict:
        """A segment of our stack toward the wire: framed, in wire space."""
        send = self.send
        assert send is not None
        if self.config.fast_paths:
            verdict = self.new_data_out(seg)
            if verdict is not None:
                self.fast_data_out += 1
                return verdict
        options = parse_options(seg.options)
        plain = to_offset(seg.seq, send.base, send.plain_next)
        end = plain + len(seg.payload) + seg.is_fin
        local_loss = self._ack_out(seg, options, now)
        seg.flags &= ~TCP_URG  # RFC 8548 §3.7: URG travels only as URGp; we send none
        seg.urgent = 0
        raw_options = seg.options
        seg.options = self._options_out(options, raw_options, partial=not seg.payload)
        if not self._keys.keys_ready:
            return self._before_keys(seg, plain, end, now)
        if not seg.payload and not seg.is_fin:
            if local_loss and not self.need_nonsyn_eno:
                return DROP
            seg.seq = to_seq(send.plain_to_wire(plain), send.base)
            return accept(serialize_segment(seg), True)
        if end <= send.acked_plain:
            # All of it was acknowledged already (the peer's ACK to our stack was lost): probe the
            # peer like a keepalive, so that it repeats its ACK.
            seg.seq = to_seq(send.acked_wire - 1, send.base)
            seg.payload = b""
            seg.flags &= ~(TCP_FIN | TCP_PSH)
            return accept(serialize_segment(seg), True)
        if plain > send.plain_next:
            raise StackAnomaly(f"local segment skips plain bytes {send.plain_next}..{plain}")
        if plain <= max(send.acked_plain, self._stack_ack) < end and send.peer_sacks:
            # Our stack resends its oldest unacknowledged bytes. If they are the start of a frame
            # the peer holds but cannot open, that tells the peer nothing (after a timeout Linux
            # sends nothing else until they are acknowledged): send the frame's missing bytes.
            for wire, data, fin in send.head_holes():
                self.inject_wire(wire, data, TCP_ACK | (TCP_FIN if fin else 0))
        stretch = self._wire_out(seg, plain, end)
        if stretch is None:
            return DROP
        return self._send_wire(seg, stretch, options, raw_options)

    def _ack_out(self, seg: Segment, options: list[tuple[int, bytes]], now: float) -> bool:
        """Our stack's acknowledgment and window, into wire space; returns whether the segment is
        a duplicate ACK about plaintext our stack lost after us (ours to answer, not the peer's)."""
        recv = self.recv
        assert recv is not None
        window_before = self.local_window
        self.note_local(seg, options)
        if not seg.is_ack:
            return False
        local_loss = False
        stack_ack = to_offset(seg.ack, recv.base, recv.local_ack)
        same_window = seg.window == window_before
        if stack_ack < recv.plain_next - recv.fin_delivered:
            dup = not seg.payload and not seg.is_fin and stack_ack == recv.local_ack and same_window
            local_loss = self._redeliver_lost(stack_ack, options, dup, now)
        ack_before = recv.ack_floor
        seg.ack = to_seq(recv.ack_to_wire(stack_ack), recv.base)
        self._note_right_edge(seg.window)
        seg.window = self._wire_window(seg.window)
        # A duplicate ACK about plaintext our stack lost after us is ours to answer (above);
        # the peer would take it for a loss on the wire and resend. It tells the peer nothing.
        return local_loss and same_window and recv.ack_floor == ack_before and not recv.ooo

    def _wire_out(self, seg: Segment, plain: int, end: int) -> tuple[int, bytes, bool] | None:
        """(wire offset, bytes, fin) that carry plain range [plain, end): slices of logged frames
        for a retransmission, byte-identical (RFC 8548 §3.6; SendStream.wire_slice), then one new
        frame for new data (one per packet, whatever its size: a super-packet is one AEAD call)."""
        send, recv = self.send, self.recv
        assert send is not None and recv is not None
        old = send.wire_slice(plain, min(end, send.plain_next)) if plain < send.plain_next else None
        if end <= send.plain_next:
            return old
        if send.fin_framed:
            raise StackAnomaly("local segment carries data after its fin")
        if send.cipher is None:  # closed by a reset our stack never got: tell it, keys are erased
            raise StackAnomaly("local data after the connection closed", Disposition.RESET)
        new = bytes(seg.payload[send.plain_next - plain :])
        self.bytes_out += len(new)
        self._sent_since_rekey += len(new)
        rekey_bytes = self.config.rekey_bytes
        if rekey_bytes and self._sent_since_rekey > rekey_bytes and recv.gen == send.gen:
            self.start_rekey()  # by volume; this frame carries rekey = 1
        wire, data, fin = _joined(send.new_frame(new, seg.is_fin, self.config.frame_max))
        if old is None:
            return wire, data, fin
        return old[0], old[1] + data, fin  # the slice reaches the end of the log: contiguous

    def _send_wire(self, seg: Segment, stretch: tuple[int, bytes, bool], options: list[tuple[int, bytes]],
                   raw_options: bytes) -> Verdict:
        """Wire bytes out in `seg`, payload and options within the wire MSS (RFC 6691). Our stack sized
        its segment for its own options; the non-SYN ENO option or frame overhead can make it
        longer: the rest follows in segments of their own. SACK blocks only take the room left.

        A super-packet (`seg.gso`) is segmented by the kernel after the verdict: it carries up to
        SUPER_PACKET_MAX bytes, with at most GSO_OPTION_ROOM option bytes beyond our stack's own
        (docs/architecture.md: Sizes); only what exceeds that goes in segments of our own."""
        send = self.send
        assert send is not None
        wire, payload, fin = stretch
        seg.seq = to_seq(wire, send.base)
        if seg.gso and self.pmtu is None:
            limit = min(TCP_MAX_OPTIONS, _padded(raw_options) + GSO_OPTION_ROOM)
            seg.options = self._options_out(options, raw_options, limit=limit)
            size = SUPER_PACKET_MAX - len(seg.ip_header) - 20 - _padded(seg.options)
            seg.payload = payload[:size]
        else:
            seg.kernel_checksum = False  # a packet the kernel will not segment, or one we send
            size = max(self.wire_mss - _padded(self._options_out(options, raw_options, self.wire_mss)), 1)
            seg.payload = payload[:size]
            seg.options = self._options_out(options, raw_options, len(seg.payload))
        rest = payload[size:]
        seg.flags = (seg.flags & ~TCP_FIN) | (TCP_FIN if fin and not rest else 0)
        if rest:
            seg.flags |= TCP_PSH
            self.inject_wire(wire + size, rest, TCP_ACK | TCP_PSH | (TCP_FIN if fin else 0))
        if self.pmtu is not None:
            # Our stack believes the path MTU is 20 bytes below the real one (Session.icmp_in), and
            # the kernel would hold our larger wire packet to that belief: send it ourselves.
            self._inject(Injection(serialize_segment(seg), Direction.OUTBOUND))
            return DROP
        return accept(serialize_segment(seg), True)

    def _before_keys(self, seg: Segment, plain: int, end: int, now: float) -> Verdict:
        """Our stack sends before the keys exist: hold its plaintext (docs/architecture.md).

        Host A's Init1 rides on the first segment after the SYN-ACK (the third ACK), and on pure
        ACKs while it is unacknowledged; the held plaintext is framed when Init2 arrives.
        """
        send = self.send
        assert send is not None
        data, fin = seg.payload, seg.is_fin
        if send.held_end < end <= self.config.held_limit and plain <= send.held_end:
            send.held.append((send.held_end, bytes(data[send.held_end - plain :]), fin))
            send.held_end = end
        if self.role is Role.A and not send.prefix_acked and (not self.init1_sent or not (data or fin)):
            self.init1_sent = True
            seg.seq = send.base
            seg.payload = send.prefix
            seg.flags = (seg.flags & ~TCP_FIN) | TCP_PSH
            if Timer.KEX not in self._timers:
                self.kex_tries = 1
                self._timers.arm(Timer.KEX, now + self.config.kex_timeout)
            return accept(serialize_segment(seg), True)
        if data or fin:
            return DROP
        seg.seq = to_seq(send.plain_to_wire(plain), send.base)
        return accept(serialize_segment(seg), True)

    def inject_frames(self, records: list[FrameRecord]) -> None:
        wire, payload, fin = _joined(records)
        self.inject_wire(wire, payload, TCP_ACK | TCP_PSH | (TCP_FIN if fin else 0))

    def translate_in(self, seg: Segment, options: list[tuple[int, bytes]] | None, now: float) -> Translated:
        """A segment from the wire toward our stack: frames opened, plaintext in plain space.

        `options` None: the segment carries timestamps or no options, already noted (note_remote,
        Session.inbound's usual case), and they go to our stack as they came."""
        send, recv = self.send, self.recv
        assert send is not None and recv is not None
        self._peer_rekeyed = False
        self.need_nonsyn_eno = False  # RFC 8547 §4.6: a non-SYN segment arrived
        acked_before = send.acked_plain
        if seg.is_ack:
            self._ack_in(seg, now)
        seg.window = self._plain_window(seg.window)
        seg.options = self._options_in(options, seg.options)
        if self._stack_ack > send.acked_plain and seg.is_ack:
            self._ack_ahead(seg)
        wire = to_offset(seg.seq, recv.base, recv.wire_next)
        data = seg.payload
        if wire + len(data) > recv.right_edge:
            recv.widen_edge(wire, data)  # the rest of the frame begun inside the window is taken
        if wire + len(data) > recv.right_edge:
            # A peer that ignores our stack's receive window: what lies beyond it (and beyond
            # the frame begun inside it) is not taken, so that the plaintext held for our stack
            # stays within that window and one frame.
            data = data[: max(recv.right_edge - wire, 0)]
            seg.flags &= ~TCP_FIN
        added, plain_start, redeliver = self._take(seg, wire, data, now)
        buf_start = recv.buf_start
        out = self._drain(now) if added else b""  # frames only complete when bytes arrive
        consumed = recv.buf_start > buf_start
        # A frame begun inside the window and ending past it: the peer may send all of it, and
        # learns so from the window of our next ACK (_wire_window).
        widened = bool(recv.buf) and recv.widen_edge()
        if out:
            recv.remember(plain_start, out)
        fin_now = False
        if recv.fin_at is not None or recv.finp or seg.is_fin or (not data and wire < recv.wire_next):
            fin_now, plain_start = self._fin_in(seg, wire, data, bool(out or redeliver), plain_start)
        if redeliver:
            out = redeliver
        elif not out and not fin_now and data and send.acked_plain == acked_before:
            if consumed or (added and recv.ooo) or widened:
                # Frames with no plaintext (rekey): our stack will not ACK them. Bytes of a frame
                # we cannot open yet while a later hole is open: our stack sees nothing, and the
                # peer learns of them only from our SACK (a resent segment would look lost again).
                # A window widened to a frame's end: our stack, shown nothing, says nothing.
                self._inject_ack(now)
            # Nothing new for our stack; an empty copy would look like a duplicate ACK.
            return self._result(DROP, check_finished=False)
        elif not out and not fin_now and not data and recv.local_ack == 0:
            # Our stack has acknowledged none of the peer's bytes: it may have no socket yet (a
            # SYN-cookie server whose accept queue overflowed dropped the completing ACK and what we
            # delivered). A pure ACK then completes the handshake only if its seq is the first one
            # (RFC 4987 §3.6: the cookie check takes seq - 1 as the peer's ISN); at the plain seq
            # after delivered data it fails and the stack resets. Linux accepts seq at its last
            # acknowledged point (rcv_wup) on an open socket too.
            plain_start = 0
        self.bytes_in += len(out) if not redeliver else 0
        seg.flags &= ~(TCP_FIN | TCP_URG | TCP_PSH)
        seg.urgent = 0
        return self._result(self._deliver(seg, plain_start, out, fin_now))

    def in_order_in(self, seg: Segment, now: float) -> Translated | None:
        """The usual data segment from the wire: the next expected bytes, nothing held out of
        order, our Init message acknowledged, no FIN seen before; and either exactly one whole
        frame (not a rekey) with nothing buffered before it, the FIN with it if any (the peer's
        last frame, FINp, RFC 8548 §3.7), or bytes that leave the frame being received still
        incomplete (a frame spans segments, RFC 8548 §4.2), without a FIN. translate_in's
        steps for those two cases: the whole frame is opened at its wire offset without the
        reassembly buffer; the incomplete one is buffered and the segment dropped, or shown to our
        stack as a pure ACK when it acknowledged our data. None, with nothing changed, for
        anything else.

        Its options are timestamps or nothing, already noted (Session.inbound's usual case)."""
        send, recv = self.send, self.recv
        assert send is not None and recv is not None
        data = seg.payload
        n = len(data)
        wire = recv.wire_next
        fin = seg.flags & TCP_FIN
        if (not n or recv.ooo or recv.cipher is None or send.acked_wire < len(send.prefix)
                or self._stack_ack > send.acked_plain
                or recv.fin_seen is not None or recv.fin_at is not None or recv.finp or recv.fin_delivered
                or wire + n > recv.right_edge or (seg.seq - recv.base - wire) & 0xFFFFFFFF):
            return None
        buf = recv.buf
        held = len(buf)
        if held >= FRAME_HEADER_LEN:
            size: int | None = FRAME_HEADER_LEN + ((buf[1] << 8) | buf[2])
        elif held + n >= FRAME_HEADER_LEN:
            header = bytes(buf) + data[: FRAME_HEADER_LEN - held]
            size = FRAME_HEADER_LEN + ((header[1] << 8) | header[2])
        else:
            size = None  # not even the frame's header yet
        whole = not held and n == size and n >= FRAME_OVERHEAD and not data[0] & CONTROL_REKEY
        if not whole and ((size is not None and (held + n >= size or recv.buf_start + size > recv.right_edge)) or fin):
            return None  # completes a frame that was begun, more than one frame, or one past the window's edge
        self._peer_rekeyed = False
        self.need_nonsyn_eno = False  # RFC 8547 §4.6: a non-SYN segment arrived
        acked_before = send.acked_plain
        if seg.flags & TCP_ACK:  # _ack_in, our Init message acknowledged
            seg.ack = to_seq(send.ack_to_plain(to_offset(seg.ack, send.base, send.acked_wire)), send.base)
            self._timers.pop(Timer.KEX, None)
        seg.window = self._plain_window(seg.window)
        send.peer_sacks = []
        plain_start = recv.plain_next
        if not whole:
            # RecvStream.add into the buffer; the drain finds no complete frame.
            buf += data
            recv.wire_next = wire + n
            if send.acked_plain == acked_before:
                return self._result(DROP, check_finished=False)  # nothing new for our stack
            seg.flags &= ~(TCP_FIN | TCP_URG | TCP_PSH)
            seg.urgent = 0
            return self._result(self._deliver(seg, plain_start, b"", False))
        # RecvStream.add and next_frame: the frame goes in and out of the empty buffer at once.
        offset = recv.buf_start
        recv.wire_next = recv.buf_start = wire + n
        if fin:
            recv.fin_seen = recv.fin_at = wire + n  # _take: every byte before the FIN is here
        plaintext = recv.cipher.open(offset, data)
        if not plaintext:
            raise RemoteProtocolError(f"frame at offset {offset} has no flags byte")
        out, finp = frame_data(plaintext)
        recv.delivered(len(out))
        if finp:
            recv.finp = True
        if out:
            recv.remember(plain_start, out)
        fin_now = False
        if finp or fin:
            fin_now, plain_start = self._fin_in(seg, wire, data, bool(out), plain_start)
        if not out and not fin_now and send.acked_plain == acked_before:
            self._inject_ack(now)  # a frame with no plaintext: our stack will not ACK it
            return self._result(DROP, check_finished=False)
        self.bytes_in += len(out)
        seg.flags &= ~(TCP_FIN | TCP_URG | TCP_PSH)
        seg.urgent = 0
        return self._result(self._deliver(seg, plain_start, out, fin_now))

    def _plain_window(self, window: int) -> int:
        """The peer's window field for our stack, less what our frames add on the wire: 1/64 of it
        (a frame of 1428 bytes costs 1.4 %), at least one frame's overhead, rounded down to the
        peer's window scale (RFC 7323 §2.3). A packet that fills the window in plain bytes then
        still fits it on the wire: the peer's engine cuts what lies beyond its stack's window, and
        a frame cut short can never be opened (with one frame per super-packet, nothing would be
        delivered and the window would never move)."""
        shift = self.remote_window_shift
        size = window << shift
        return max(size - max(size >> 6, FRAME_OVERHEAD), 0) >> shift

    def _ack_in(self, seg: Segment, now: float) -> None:
        """The peer's acknowledgment, into plain space; a missing Init message resent."""
        send = self.send
        assert send is not None
        wire_ack = to_offset(seg.ack, send.base, send.acked_wire)
        if self._keys.keys_ready and not send.prefix_acked and wire_ack == send.acked_wire:
            # The peer lacks our Init message and says so with duplicate ACKs: resend it now.
            self._prefix_dupacks += 1
            if self._prefix_dupacks % 3 == 0:
                self.send_prefix(now)
        seg.ack = to_seq(send.ack_to_plain(wire_ack), send.base)
        if send.prefix_acked and self._keys.keys_ready:
            self._timers.cancel(Timer.KEX)

    def _take(self, seg: Segment, wire: int, data: bytes, now: float) -> tuple[bool, int, bytes]:
        """Wire bytes into the receive stream: (whether they were new, the plain offset of what
        the drain delivers, plaintext to deliver again for a peer's retransmission)."""
        send, recv = self.send, self.recv
        assert send is not None and recv is not None
        plain_start = recv.plain_next
        redeliver = b""
        if seg.is_fin and recv.fin_seen is None:
            recv.fin_seen = wire + len(data)
        added = bool(data) and recv.add(wire, data, self.config.ooo_limit, now)
        if data and not added:
            if self._keys.keys_ready and not send.prefix_acked:
                self.send_prefix(now)
            if wire + len(data) <= recv.buf_start and recv.local_ack < recv.plain_next - recv.fin_delivered:
                # The peer resends what we delivered and our stack has not acknowledged:
                # deliver that plaintext again so that our stack acknowledges it (docs/architecture.md).
                plain_start, redeliver = recv.unacked_plaintext(self.config.deliver_max)
            else:
                self._inject_ack(now)  # a duplicate ACK (with SACK blocks) toward the peer
        if recv.fin_seen is not None and recv.fin_at is None and recv.wire_next == recv.fin_seen:
            recv.fin_at = recv.fin_seen
        return added, plain_start, redeliver

    def _fin_in(self, seg: Segment, wire: int, data: bytes, delivering: bool, plain_start: int) -> tuple[bool, int]:
        """The peer's FIN toward our stack once every byte before it is delivered, and only after
        a FINp frame (RFC 8548 §3.7); also a retransmitted FIN or a keepalive probe shown again.
        Returns (whether this segment carries the FIN to our stack, its plain offset)."""
        recv = self.recv
        assert recv is not None
        if recv.fin_at is not None and not recv.fin_delivered and recv.buf_start == recv.fin_at:
            if not recv.finp:
                # RFC 8548 §3.7: a FIN without FINp; abort with an error distinct from EOF.
                raise RemoteProtocolError("fin without a finp frame")
            recv.fin_delivered = True
            recv.delivered(0, True)
            return True, plain_start
        if recv.finp and recv.buf:
            raise RemoteProtocolError("data after the finp frame")
        if seg.is_fin and recv.fin_delivered and not delivering:
            return True, recv.plain_next - 1  # a retransmitted FIN: show it again, our stack re-ACKs
        if not data and not seg.is_fin and wire < recv.wire_next:
            return False, recv.plain_next - 1 - recv.fin_delivered  # a keepalive probe: our stack answers
        return False, plain_start

    def _result(self, verdict: Verdict, check_finished: bool = True) -> Translated:
        send, recv = self.send, self.recv
        assert send is not None and recv is not None
        rekeyed, self._peer_rekeyed = self._peer_rekeyed, False
        closing = recv.fin_delivered or send.fin_framed
        finished = check_finished and recv.fin_delivered and send.fin_framed and send.unacked == 0
        return Translated(verdict, rekeyed, closing, finished)

    def _deliver(self, seg: Segment, plain_start: int, data: bytes, fin: bool) -> Verdict:
        """Hand plaintext to our stack: the first chunk in the verdict, the rest injected.

        A super-packet's verdict carries up to SUPER_PACKET_MAX bytes when `gso_deliver` (a
        host's own stack takes it whole); otherwise, and for what we inject, chunks of deliver_max
        bytes (a gateway's inside link, docs/architecture.md: Sizes)."""
        recv = self.recv
        assert recv is not None
        # deliver_max allows 20 bytes of options; more (SACK blocks) take room from the payload.
        size = max(min(self.config.deliver_max, self.config.deliver_max + 20 - _padded(seg.options)), 1)
        first_size = size
        if seg.gso and self.config.gso_deliver:
            first_size = SUPER_PACKET_MAX - len(seg.ip_header) - 20 - _padded(seg.options)
        first = None
        at = 0
        while True:
            step = size if first is not None else first_size
            chunk = data[at : at + step]
            last = at + step >= len(data)
            seg.seq = to_seq(plain_start + at, recv.base)
            seg.payload = chunk
            flags = seg.flags & ~(TCP_FIN | TCP_PSH)
            seg.flags = flags | (TCP_PSH if chunk else 0) | (TCP_FIN if fin and last else 0)
            packet = serialize_segment(seg)
            if first is None:
                first = packet
            else:
                self._inject(Injection(packet, Direction.INBOUND))
            if last:
                break
            at += step
        return accept(first, True)

    def _drain(self, now: float) -> bytes:
        """Consume the Init message and every complete frame; return the plaintext to deliver."""
        recv = self.recv
        assert recv is not None
        if not self._keys.keys_ready:  # the peer's Init message comes first (RFC 8548 §3.3)
            magic = INIT1_MAGIC if self.role is Role.B else INIT2_MAGIC
            try:
                length = init_message_length(recv.buf, magic)
            except MalformedSegment as exc:
                raise RemoteProtocolError(f"bad init message: {exc}") from None
            if length is None or len(recv.buf) < length:
                if length is not None and not 8 <= length <= MAX_INIT_LEN:
                    raise RemoteProtocolError(f"init message_len {length} out of range")
                return b""
            message = recv.consume(length)
            recv.delivered(0)
            try:
                self._keys.init_message(message, now)
            except MalformedSegment as exc:
                raise RemoteProtocolError(f"malformed init message: {exc}") from None
            if not self._keys.keys_ready:
                return b""  # host B derives its keys after its Init2 (Session.init_message)
        out: list[bytes] = []  # joined once: no copy for a single frame
        cipher = recv.cipher
        while True:
            item = recv.next_frame()
            if item is None:
                break
            if cipher is None:  # the connection closed and its keys are wiped (Session._set_state)
                raise RemoteProtocolError("frame after the connection closed")
            offset, frame = item
            if recv.finp:
                raise RemoteProtocolError("frame after the finp frame")
            if is_rekey(frame[0]):
                # The peer moved to its next key set (RFC 8548 §3.8); the session answers.
                recv.gen += 1
                recv.cipher = cipher = self._keys.cipher(recv.gen, sending=False)
                self._peer_rekeyed = True
            plaintext = cipher.open(offset, frame)
            if not plaintext:
                raise RemoteProtocolError(f"frame at offset {offset} has no flags byte")
            body, finp = frame_data(plaintext)
            out.append(body)
            recv.delivered(len(body))
            if finp:
                recv.finp = True
        return b"".join(out)

    # ------------------------------------------------------------------ building segments

    def note_local(self, seg: Segment, options: list[tuple[int, bytes]], syn: bool = False) -> None:
        """Remember our stack's window (in scaled units) and TSval for segments we build."""
        shift = self.local_ws if self.remote_ws is not None else None
        self.local_window = seg.window >> shift if syn and shift else seg.window
        ts = timestamp(options)
        if ts is not None:
            self._local_ts = ts[0]

    def note_remote(self, seg: Segment, options: list[tuple[int, bytes]]) -> None:
        """Remember the peer's TSval (echoed in segments we build) and its SYN options."""
        if seg.is_syn:
            self.remote_ws = window_scale(options)
            self.remote_sack_perm = any(kind == TCPOPT_SACK_PERM for kind, _ in options)
        else:
            self._remote_window = seg.window - (seg.window >> 6)
        ts = timestamp(options)
        if ts is not None:
            self._remote_ts = ts[0]

    def note_remote_usual(self, window: int, raw: bytes) -> None:
        """note_remote for a non-SYN segment whose options are timestamps (`raw` in the form
        Linux sends, usual_options) or nothing."""
        self._remote_window = window - (window >> 6)
        if raw:
            self._remote_ts = usual_tsval(raw)

    def _options_out(self, parsed: list[tuple[int, bytes]], raw: bytes, payload_len: int = 0,
                     limit: int | None = None, partial: bool = False) -> bytes:
        """Options of a segment toward the wire: our own SACK blocks for out-of-order data we hold,
        in wire space, plus the non-SYN ENO option while RFC 8547 §4.6 wants it.

        The SACK blocks take at most the room `payload_len` bytes of payload leave within the
        wire MSS (RFC 6691): the blocks that do not fit are left out (RFC 2018 §4 puts the most
        recent first), and every duplicate ACK we send without payload carries them all. `limit`,
        when given, is the room instead (a super-packet's, _send_wire).

        With `partial` (the ACKs we inject) the bytes of a frame we hold in order but cannot open
        yet also go as a SACK block: the cumulative ACK stays at the frame's start until it is
        whole, and without the block the peer's stack would not know that the frame's first
        segments arrived (a retransmission of them would tell it nothing, and with big frames it
        would wait for timeouts; RFC 2018 §3 allows any received bytes above the ACK)."""
        recv = self.recv
        assert recv is not None
        held = partial and self.sack_ok and self._keys.keys_ready and recv.wire_next > recv.buf_start
        if not self.need_nonsyn_eno and not recv.ooo and not held and not _has_sack_or_eno(parsed):
            return raw  # the usual case: nothing to translate
        # The SACK blocks our stack sends are about plaintext it lost after us, or D-SACKs
        # (RFC 2883) of our own redeliveries: ours to answer (_redeliver_lost), and they would
        # mislead the peer. The blocks the peer needs are ours: the out-of-order data we hold.
        kept = [(kind, option) for kind, option in parsed
                if kind > TCPOPT_NOP and kind != ENO_OPTION_KIND and kind != TCPOPT_SACK]
        blocks = recv.sack_blocks(4) if self.sack_ok and recv.ooo else []
        if held:
            blocks.insert(1, (recv.buf_start, recv.wire_next))  # after the latest arrival (RFC 2018 §4)
        if self.need_nonsyn_eno:
            kept.append((ENO_OPTION_KIND, NON_SYN_ENO))
        if limit is None:
            limit = min(TCP_MAX_OPTIONS, self.wire_mss - payload_len)
        return with_sack(kept, [(to_seq(lo, recv.base), to_seq(hi, recv.base)) for lo, hi in blocks], limit)

    def _options_in(self, parsed: list[tuple[int, bytes]] | None, raw: bytes) -> bytes:
        """Options of a segment toward our stack: SACK blocks into plain space, ENO removed
        (None: timestamps or nothing, as they came)."""
        send = self.send
        assert send is not None
        send.peer_sacks = []
        if parsed is None or not _has_sack_or_eno(parsed):
            return raw
        kept, blocks = [], []
        for kind, option in parsed:
            if kind == TCPOPT_SACK:
                for left, right in sack_pairs(option):
                    lo = to_offset(left, send.base, send.acked_wire)
                    hi = to_offset(right, send.base, send.acked_wire)
                    send.peer_sacks.append((lo, hi))
                    plain = send.sack_to_plain(lo, hi)
                    if plain is None:
                        continue
                    if lo <= send.acked_wire < hi:
                        # The peer holds, in order from its cumulative ACK, the first bytes of a
                        # frame it cannot open yet: our stack sees them acknowledged (_ack_ahead),
                        # so that it resends only what the peer lacks, as it would without us.
                        self._stack_ack = max(self._stack_ack, plain[1])
                        continue
                    # A block must start after the cumulative ACK (Linux takes no other but a
                    # D-SACK): the peer holds a frame's first bytes it cannot open yet.
                    # A frame's first byte is SACKed like the rest even while the frame is
                    # incomplete: left out, our stack's RACK took that segment for lost while the
                    # frame was still arriving and resent it. Once the peer's ACK stops at that
                    # frame's start, the block of what it holds from there moves our stack's ACK
                    # past it (above), so no SACKed segment sits at its snd_una (RFC 2018 §8).
                    left, right = max(plain[0], send.acked_plain + 1, self._stack_ack + 1), plain[1]
                    if left < right:
                        blocks.append((left, right))
            elif kind > TCPOPT_NOP and kind != ENO_OPTION_KIND:
                kept.append((kind, option))
        return with_sack(kept, [(to_seq(lo, send.base), to_seq(hi, send.base)) for lo, hi in blocks])

    def _ack_ahead(self, seg: Segment) -> None:
        """The peer's ACK toward our stack at the furthest plain byte it holds in order (the
        start of a frame it cannot open yet, _options_in), never behind one shown before; the
        window's right edge stays where the peer put it (RFC 7323 §2.4)."""
        send = self.send
        assert send is not None
        ahead = self._stack_ack - to_offset(seg.ack, send.base, send.acked_plain)
        if ahead <= 0:
            return
        seg.ack = to_seq(self._stack_ack, send.base)
        shift = self.remote_window_shift
        seg.window = max((seg.window << shift) - ahead, 0) >> shift

    def _ts_options(self, ours: int | None, theirs: int | None) -> bytes:
        if ours is None or theirs is None:
            return b""
        return timestamp_option(ours, theirs)

    def inject_wire(self, wire: int, payload: bytes, flags: int) -> None:
        """A segment of our wire stream toward the peer."""
        send, recv = self.send, self.recv
        assert send is not None and recv is not None
        f = self.flow
        ts = self._ts_options(self._local_ts, self._remote_ts)
        parsed = parse_options(ts)
        ack = to_seq(recv.ack_to_wire(recv.local_ack), recv.base)
        window = self._wire_window(self.local_window)
        # Payload and options within the wire MSS (RFC 6691); a longer payload goes out in several
        # segments, the FIN on the last.
        partial = not payload  # our ACKs: they tell what we hold of an unopened frame
        size = max(self.wire_mss - _padded(ts if flags & TCP_RST else self._options_out(parsed, ts, self.wire_mss)), 1)
        at = 0
        while True:
            chunk = payload[at : at + size]
            last = at + size >= len(payload)
            options = ts if flags & TCP_RST else self._options_out(parsed, ts, len(chunk), partial=partial)
            seg = new_segment(
                f.local_ip, f.remote_ip, f.local_port, f.remote_port, to_seq(wire + at, send.base), ack,
                flags if last else flags & ~TCP_FIN, window, options, chunk,
            )
            if self.out_ip is not None:
                seg.ip_header = without_ecn(self.out_ip)
            self._inject(Injection(serialize_segment(seg), Direction.OUTBOUND))
            if last:
                return
            at += size

    def _note_right_edge(self, window: int) -> None:
        """Our stack's window field: its right edge in wire space (never moves left, RFC 7323 §2.4)."""
        recv = self.recv
        assert recv is not None
        shift = self.window_shift
        edge = recv.local_ack_wire + (window << shift)
        recv.right_edge = max(recv.right_edge, edge) if recv.edge_known else edge
        recv.edge_known = True

    def _wire_window(self, window: int) -> int:
        """Our stack's window field for the wire, where the ACK may be ahead of our stack's own
        (RecvStream.ack_delivered): the right edge stays where our stack put it, or at the end of
        a frame begun inside it (RecvStream.widen_edge), rounded up to the scale."""
        recv = self.recv
        assert recv is not None
        if recv.widened:
            shift = self.window_shift
            if recv.right_edge > recv.local_ack_wire + (window << shift):
                return min(max(recv.right_edge - recv.ack_floor + (1 << shift) - 1, 0) >> shift, 0xFFFF)
            recv.widened = False  # our stack's own edge reached the frame's end
        ahead = recv.ack_floor - recv.local_ack_wire
        if ahead <= 0:
            return window
        shift = self.window_shift
        return max(0, (window << shift) - ahead) >> shift

    def _inject_ack(self, now: float) -> None:
        """An ACK (a duplicate one while a gap is open, with SACK blocks) toward the peer, for
        everything we delivered; if our stack has not acknowledged all of it yet, a timer makes
        sure it gets it (RecvStream.ack_delivered)."""
        send, recv = self.send, self.recv
        assert send is not None and recv is not None
        recv.ack_delivered()
        self.inject_wire(send.wire_next, b"", TCP_ACK)
        if recv.local_ack < recv.plain_next:
            self._arm_replay(recv.plain_next, now)

    def _arm_replay(self, mark: int, now: float) -> None:
        """Unless it runs already, the replay timer (`on_replay`) for plaintext up to `mark` our
        stack has not acknowledged."""
        if Timer.REPLAY not in self._timers:
            self._replay_tries = 0
            self._replay_mark = mark
            self._timers.arm(Timer.REPLAY, now + REPLAY_TIMEOUT)

    def _redeliver_lost(self, stack_ack: int, options: list[tuple[int, bytes]], dup: bool, now: float) -> bool:
        """Our stack's SACK blocks or duplicate ACK toward the peer show plaintext we delivered and
        it lost on the way in (a firewall rule, a full queue): hand the missing bytes to it again
        at once, as TCP's own fast retransmit would (RFC 6675 §5), within the window it offers.
        Returns whether the ACK was such a report.

        Each byte goes again this way at most once (`RecvStream.redelivered_to`); if that copy is
        lost too, the replay timer, with its backoff, is the last resort."""
        recv = self.recv
        assert recv is not None
        delivered = recv.plain_next - recv.fin_delivered
        blocks = []
        for kind, raw in options:
            if kind == TCPOPT_SACK:
                for left, right in sack_pairs(raw):
                    lo, hi = to_offset(left, recv.base, stack_ack), to_offset(right, recv.base, stack_ack)
                    if stack_ack < lo < hi <= delivered:
                        blocks.append((lo, hi))
        if blocks:
            top = max(hi for _, hi in blocks)
        elif dup:
            top = min(delivered, stack_ack + self.config.deliver_max)
        else:
            return False
        room = stack_ack + (self.local_window << self.window_shift)
        if top > room:
            # Never beyond our stack's window; what does not fit now the replay timer gives it
            # once it has room (its window update may be no duplicate ACK, and the peer, shown
            # those bytes as acknowledged, may never resend them).
            self._arm_replay(top, now)
            top = room
        at = max(stack_ack, recv.redelivered_to)
        if at >= top:
            return True
        holes = []
        for lo, hi in sorted(blocks):
            if lo > at:
                holes.append((at, min(lo, top)))
            at = max(at, hi)
            if at >= top:
                break
        if not blocks:
            holes.append((at, top))
        recv.redelivered_to = top
        if not holes:
            return True
        for lo, hi in holes:
            data = recv.plaintext(lo, hi)
            for chunk_at in range(0, len(data), self.config.deliver_max):
                chunk = data[chunk_at : chunk_at + self.config.deliver_max]
                self._inject_local(lo + chunk_at, chunk, TCP_ACK | TCP_PSH)
        self.redelivered += len(holes)
        self._arm_replay(top, now)
        return True

    def on_replay(self, now: float) -> None:
        """Our stack has still not acknowledged plaintext we acknowledged for it: give it again.

        Only what was delivered before the timer was armed counts: in a bulk transfer our stack
        always lags the newest delivery by a delayed ACK, and that is no reason to redeliver.
        The delay doubles with each try, up to REPLAY_MAX_BACKOFF times the first."""
        recv = self.recv
        assert recv is not None
        if recv.local_ack >= self._replay_mark:
            return
        start, data = recv.unacked_plaintext(self.config.deliver_max)
        if data:
            self._inject_local(start, data, TCP_ACK | TCP_PSH)
        elif recv.fin_delivered and recv.local_ack < recv.plain_next:
            self._inject_local(recv.plain_next - 1, b"", TCP_ACK | TCP_FIN)  # our stack lost the FIN
        else:
            return
        self._replay_tries += 1
        self.replayed += 1
        backoff = min(2**self._replay_tries, REPLAY_MAX_BACKOFF)
        self._timers.arm(Timer.REPLAY, now + REPLAY_TIMEOUT * backoff)

    def _inject_local(self, plain: int, payload: bytes, flags: int) -> None:
        """A segment toward our own stack, at plain offset `plain` of the peer's stream."""
        send, recv = self.send, self.recv
        assert send is not None and recv is not None
        f = self.flow
        options = b"" if flags & TCP_RST else self._ts_options(self._remote_ts, self._local_ts)
        ack, window = send.acked_plain, self._remote_window
        if self._stack_ack > ack:  # the ACK our stack was shown (_ack_ahead), its right edge kept
            shift = self.remote_window_shift
            ack, window = self._stack_ack, max((window << shift) - (self._stack_ack - ack), 0) >> shift
        seg = new_segment(
            f.remote_ip, f.local_ip, f.remote_port, f.local_port, to_seq(plain, recv.base),
            to_seq(ack, send.base), flags, window, options, payload,
        )
        if self.in_ip is not None:
            seg.ip_header = without_ecn(self.in_ip)
        self._inject(Injection(serialize_segment(seg), Direction.INBOUND))

    def inject_local_rst(self) -> None:
        assert self.recv is not None
        self._inject_local(self.recv.plain_next, b"", TCP_RST | TCP_ACK)


def _has_sack_or_eno(parsed: list[tuple[int, bytes]]) -> bool:
    for kind, _ in parsed:  # a loop, not any(...): this runs twice per packet
        if kind == TCPOPT_SACK or kind == ENO_OPTION_KIND:
            return True
    return False


def _joined(records: list[FrameRecord]) -> tuple[int, bytes, bool]:
    """(wire offset, bytes, fin) of consecutive frame records as one stretch of the wire stream."""
    return records[0].wire_start, b"".join(r.data for r in records), records[-1].fin


def _padded(options: bytes) -> int:
    """Length of an options block on the wire (padded to 4 bytes, as serialize_segment does)."""
    return (len(options) + 3) & ~3
