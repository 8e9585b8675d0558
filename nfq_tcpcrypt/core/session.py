"""Session: one connection's state machine: handshake, key exchange, rekeying, closing, aborts (docs/states.md).

Rule (as in h11): every state change of a connection lives in this file, in `TRANSITIONS`, and goes
through `_set_state`. The session is role-agnostic at the packet level: `Direction` says which way a
packet travels; the ENO role (A or B, RFC 8547 §4.3) says which keys and Init message apply.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import replace
from enum import StrEnum
from typing import Final

from . import eno
from .aead import FrameCipher, traffic_key_len
from .config import Configuration
from .constants import (
    AEAD_NAMES,
    ENO_OPTION_KIND,
    FRAME_OVERHEAD,
    N_A_LEN,
    N_B_LEN,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    TCPOPT_FASTOPEN,
    TCPOPT_NOP,
    TEP_NAMES,
    Aead,
    Role,
    Tep,
)
from .errors import Disposition, LocalProtocolError, MalformedSegment, ProtocolError, RemoteProtocolError
from .events import EnoNegotiated, Event, FellBackToPlain, SessionAborted, SessionClosed, SessionEstablished
from .flow import FlowKey
from .guard import ChallengeLimiter, RstCheck, check_rst
from .kex import KeyPool, KeySchedule, PrivateKey, TrafficKeys, public_bytes, session_secret, shared_secret
from .outoforder import Budget
from .resumption import Resumable, SecretCache
from .seqmap import RecvStream, SendStream, to_offset, to_seq
from .timers import Timer, Timers
from .translate import StreamTranslator, Translated
from .verdict import ACCEPT, DROP, Injection, Verdict, accept
from .wire.eno import EnoOption
from .wire.icmp import IcmpError, serialize_icmp_error
from .wire.tcp import (
    Segment,
    clamp_mss,
    mss,
    parse_options,
    serialize_options,
    serialize_segment,
    usual_options,
)
from .wire.tcpcrypt import (
    Init1,
    Init2,
    parse_init1,
    parse_init2,
    serialize_init1,
    serialize_init2,
)

logger = logging.getLogger(__name__)

MIN_PMTU_V4: Final = 552
"""The lowest IPv4 path MTU a too-big report can set (Linux's net.ipv4.route.min_pmtu default)."""
MIN_PMTU_V6: Final = 1280
"""The IPv6 minimum link MTU (RFC 8200 §5)."""


class State(StrEnum):
    """States of a session (docs/states.md, generated from `TRANSITIONS`); a StrEnum: the
    transition table is looked up with string-fast hashing."""

    NEW = "new"
    ENO_SENT = "eno-sent"  # active opener: our SYN carries ENO
    ENO_RECEIVED = "eno-received"  # passive opener: the peer's SYN carried a TEP we accept
    KEY_EXCHANGE = "key-exchange"  # ENO succeeded (RFC 8547 §4.6); Init1/Init2 in flight
    ENCRYPTING = "encrypting"  # keys exist; every payload byte is framed
    CLOSING = "closing"  # a FIN went one way (framed by us, or delivered to our stack)
    CLOSED = "closed"  # FIN both ways and ours acknowledged, or a reset; lingers without keys, still translated
    PLAIN = "plain"  # fallback: the connection passes untouched
    REFUSED = "refused"  # policy `require` could not be met: reset, its packets dropped
    ABORTED = "aborted"  # reset by us toward both ends


class Trigger(StrEnum):
    """What moves a session between states."""

    SYN_SENT = "syn-sent"
    SYN_RECEIVED = "syn-received"
    ENO_OK = "eno-ok"
    KEYS = "keys"
    FALLBACK = "fallback"
    FIN = "fin"  # a FIN one way
    FINISHED = "finished"  # FIN both ways, ours acknowledged (for a plain connection: a FIN)
    RESET = "reset"  # an RST from either end
    REFUSE = "refuse"
    ABORT = "abort"


TRANSITIONS: Final[dict[tuple[State, Trigger], State]] = {
    (State.NEW, Trigger.SYN_SENT): State.ENO_SENT,
    (State.NEW, Trigger.SYN_RECEIVED): State.ENO_RECEIVED,
    (State.NEW, Trigger.FALLBACK): State.PLAIN,
    (State.ENO_SENT, Trigger.ENO_OK): State.KEY_EXCHANGE,
    (State.ENO_SENT, Trigger.FALLBACK): State.PLAIN,
    (State.ENO_SENT, Trigger.RESET): State.CLOSED,
    (State.ENO_RECEIVED, Trigger.ENO_OK): State.KEY_EXCHANGE,
    (State.ENO_RECEIVED, Trigger.FALLBACK): State.PLAIN,
    (State.ENO_RECEIVED, Trigger.RESET): State.CLOSED,
    (State.KEY_EXCHANGE, Trigger.KEYS): State.ENCRYPTING,
    (State.KEY_EXCHANGE, Trigger.RESET): State.CLOSED,
    (State.KEY_EXCHANGE, Trigger.ABORT): State.ABORTED,
    (State.ENCRYPTING, Trigger.FIN): State.CLOSING,
    (State.ENCRYPTING, Trigger.RESET): State.CLOSED,
    (State.ENCRYPTING, Trigger.ABORT): State.ABORTED,
    (State.CLOSING, Trigger.FINISHED): State.CLOSED,
    (State.CLOSING, Trigger.RESET): State.CLOSED,
    (State.CLOSING, Trigger.ABORT): State.ABORTED,
    (State.CLOSED, Trigger.RESET): State.CLOSED,
    (State.CLOSED, Trigger.ABORT): State.ABORTED,
    (State.PLAIN, Trigger.FINISHED): State.PLAIN,
    (State.PLAIN, Trigger.RESET): State.PLAIN,
    (State.PLAIN, Trigger.REFUSE): State.REFUSED,
}
"""Every state change of a session: (state, trigger) -> new state."""

_ENDING: Final = (Trigger.FINISHED, Trigger.RESET, Trigger.REFUSE, Trigger.ABORT)
"""Triggers that end the connection: the session lingers from the first of them on."""

# Tuples, not sets: membership by identity, without hashing an Enum on the per-packet path.
_TRANSLATING: Final = (State.KEY_EXCHANGE, State.ENCRYPTING, State.CLOSING)
_KEYED: Final = (State.ENCRYPTING, State.CLOSING)
_LIVE: Final = _TRANSLATING
_SYN_RST: Final = TCP_SYN | TCP_RST


class Session:
    """One TCP connection through the daemon, keyed by its local-side 4-tuple."""

    def __init__(
        self, flow: FlowKey, config: Configuration, emit: Callable[[Event], None],
        inject: Callable[[Injection], None], cache: SecretCache | None = None,
        ooo_budget: Budget | None = None, armed: dict[Session, None] | None = None,
        keys: KeyPool | None = None, ahead: dict[Session, None] | None = None,
    ) -> None:
        self._cache = cache
        self._ahead = ahead  # the engine's sessions with work for Engine.prepare
        # A resumed session's keys made ahead by `prepare`, with the negotiation they came from.
        self._made_ahead: tuple[eno.Negotiated, _Keyed] | None = None
        # Host B's key derivation after its Init2 went out (init_message): the AEAD chosen, N_A,
        # Init1, Init2, our private key and the peer's public key; `_finish_kex` consumes it.
        self._kex_later: tuple[Aead, bytes, bytes, bytes, PrivateKey, bytes] | None = None
        self._key_pool = keys
        self._ooo_budget = ooo_budget
        self._no_cache = False
        self._resume: Resumable | None = None
        self.flow = flow
        self.config = config
        self._emit = emit
        self.state = State.NEW
        # Whether traffic keys exist (RFC 8548 §3.3): encrypting, closing, or closed after keys;
        # set by _set_state with every change of state, read on every packet.
        self.keys_ready = False
        self.role: Role | None = None  # RFC 8547 §4.3
        self.key_role: Role | None = None  # our role in the session that made ss[0] (RFC 8548 §3.5)
        self.tep: Tep | None = None
        self.tep_byte = 0  # the negotiated TEP's byte as B sent it (RFC 8547 §5.1)
        self.aead: Aead | None = None
        self.session_id: bytes | None = None
        self.resumed = False
        self.eno_a = b""  # A's SYN-form ENO option, verbatim (RFC 8547 §4.8)
        self.eno_b = b""
        self.isn_local: int | None = None
        self.isn_remote: int | None = None
        self.created_at = 0.0
        self.last_seen = 0.0
        self.closed_at: float | None = None
        self._timers = Timers(armed, self)
        self.tx = StreamTranslator(flow, config, inject, self._timers, self)
        self._tail_tries = 0
        self._schedule: KeySchedule | None = None
        self._keys: dict[int, TrafficKeys] = {}
        self._syn_eno = b""  # our SYN-form ENO option (the same in SYN and SYN-ACK, §4.6)
        self._syn_option: EnoOption | None = None  # the same, decoded (eno.negotiate takes it)
        self._syn_count = 0  # retransmissions of our SYN
        self._negotiated: eno.Negotiated | None = None
        self._simultaneous = False
        self._private_key: PrivateKey | None = None
        self._n_a = b""
        self._init1 = b""
        self._ciphers_offered: tuple[int, ...] = ()
        self._challenges = ChallengeLimiter()
        self._synchronized = False  # a non-SYN segment came from the wire
        self._fast = config.fast_paths
        # Packets each fast path took (pure ACK out, pure ACK in, data in): tests compare the paths.
        self.fast_taken = [0, 0, 0]
        self.required = False  # policy `require`: never plain (the engine resets instead)
        self.delegated = False  # our side negotiates TCP-ENO itself: not plain, not ours

    # ------------------------------------------------------------------ state machine

    def _set_state(self, trigger: Trigger, now: float | None = None) -> None:
        """The one way to change state: through `TRANSITIONS`; an ending trigger stamps `closed_at`."""
        try:
            new = TRANSITIONS[(self.state, trigger)]
        except KeyError:
            raise LocalProtocolError(f"no transition from {self.state.value} on {trigger.value}") from None
        # StrEnums format as their values: nothing is formatted unless DEBUG is on.
        logger.debug("%s: %s -> %s (%s)", self.flow, self.state, new, trigger)
        if new is State.CLOSED and self.state is not State.CLOSED:
            # Nothing is sealed or opened once closed (a late duplicate is translated without
            # keys): the keys go now, not after the linger (README: Security model).
            self.wipe_secrets()
        self.state = new
        self.keys_ready = new in _KEYED or (new is State.CLOSED and self.session_id is not None)
        if trigger in _ENDING and self.closed_at is None:
            self.closed_at = self.last_seen if now is None else now

    def _fall_back(self, reason: str) -> None:
        self._drop_made_ahead()
        self._set_state(Trigger.FALLBACK)
        self._emit(FellBackToPlain(self.flow, reason))

    def pass_plain(self) -> None:
        """The engine cannot parse what the session was started with: the connection stays plain."""
        if (self.state, Trigger.FALLBACK) in TRANSITIONS:
            self._set_state(Trigger.FALLBACK)

    def refuse(self, now: float) -> None:
        """Policy `require` and a plain connection: the engine resets it (README: Security model)."""
        self._set_state(Trigger.REFUSE, now)

    @property
    def refused(self) -> bool:
        """Reset under `require`: its packets are dropped."""
        return self.state is State.REFUSED

    @property
    def live(self) -> bool:
        """Translating and not yet ended: a daemon that stops must abort it."""
        return self.state in _LIVE


    @property
    def send(self) -> SendStream | None:
        """Our stream toward the peer, once ENO succeeded."""
        return self.tx.send

    @property
    def recv(self) -> RecvStream | None:
        """The peer's stream toward us, once ENO succeeded."""
        return self.tx.recv

    @property
    def wire_mss(self) -> int:
        """The largest payload plus options of a wire segment (RFC 6691)."""
        return self.tx.wire_mss

    @property
    def pmtu(self) -> int | None:
        """The path MTU a too-big report gave, once there was one."""
        return self.tx.pmtu

    @property
    def embryonic(self) -> bool:
        """Whether the connection is still opening: ENO has not succeeded, and no non-SYN segment
        came from the wire (a spoofed SYN's session never gets one): a short timeout applies."""
        return self.state in (State.NEW, State.ENO_SENT, State.ENO_RECEIVED) or (
            self.state == State.PLAIN and not self._synchronized
        )

    @property
    def is_translating(self) -> bool:
        """Whether packets of this session are rewritten between the two byte spaces: from ENO's
        success on, also once closed (retransmissions, the last ACKs), until it lingers out."""
        return self.state in _TRANSLATING or (self.state is State.CLOSED and self.tx.send is not None)

    # ------------------------------------------------------------------ entry points

    def outbound(self, seg: Segment, now: float) -> Verdict:
        """A packet from the local stack toward the wire."""
        self.last_seen = now
        if self.keys_ready and self.state in _KEYED and not seg.flags & _SYN_RST:
            # The usual case, encrypting: straight to the translator.
            tx = self.tx
            tx.out_ip = seg.ip_header
            if seg.flags == TCP_ACK and self._fast:
                verdict = tx.pure_ack_out(seg)  # a pure ACK, or None
                if verdict is not None:
                    self.fast_taken[0] += 1
                    return verdict
            try:
                fin = bool(seg.flags & TCP_FIN)
                verdict = tx.translate_out(seg, now)
                if fin and self.state is State.ENCRYPTING:
                    self._after_out()
                return verdict
            except MalformedSegment:
                return DROP
            except ProtocolError as exc:
                return self._error(exc, seg, now, outbound=True)
        if self.state in (State.PLAIN, State.NEW):
            return self._plain(seg)
        if self.state == State.ABORTED:
            return DROP
        self.tx.out_ip = seg.ip_header
        try:
            if seg.is_rst:
                return self._rst_out(seg, now)
            if seg.is_syn:
                return self._syn_out(seg)
            if self._kex_later is not None and self._keys_now(now):
                return DROP
            if not self.is_translating:
                return self._plain(seg)
            fin = seg.is_fin
            verdict = self.tx.translate_out(seg, now)
            if fin and self.state is State.ENCRYPTING:
                self._after_out()
            return verdict
        except MalformedSegment:
            return DROP if self.is_translating else ACCEPT
        except ProtocolError as exc:
            return self._error(exc, seg, now, outbound=True)

    def inbound(self, seg: Segment, now: float) -> Verdict:
        """A packet from the wire toward the local stack."""
        self.last_seen = now
        if seg.flags == TCP_ACK and self._fast and self.keys_ready and self.state in _KEYED:
            self._synchronized = True
            self.tx.in_ip = seg.ip_header
            verdict = self.tx.pure_ack_in(seg)  # the usual case, or None
            if verdict is not None:
                self.fast_taken[1] += 1
                return verdict
        if not seg.flags & _SYN_RST and self.keys_ready and self.state in _KEYED:
            raw = seg.options
            if usual_options(raw):
                # The usual case, encrypting, timestamps or no options (RFC 7323 §3): noted here
                # (note_remote) instead of through an option list, then the translator.
                self._synchronized = True
                tx = self.tx
                tx.in_ip = seg.ip_header
                tx.note_remote_usual(seg.window, raw)
                try:
                    result = tx.in_order_in(seg, now) if seg.payload and self._fast else None
                    if result is not None:
                        self.fast_taken[2] += 1
                    return self._after_in(result or tx.translate_in(seg, None, now), now)
                except MalformedSegment:
                    return DROP
                except ProtocolError as exc:
                    return self._error(exc, seg, now, outbound=False)
        self._synchronized = self._synchronized or not seg.is_syn
        if self.state in (State.PLAIN, State.NEW):
            return self._plain(seg)
        if self.state == State.ABORTED:
            return DROP
        if self.is_translating:
            # RFC 5961: checked in wire space before anything of the segment is taken.
            if seg.is_syn and seg.seq != self.isn_remote:
                return self._challenge(now)  # §4.2: a SYN on a synchronized connection
            if seg.is_rst:
                return self._rst_in(seg, now)
            if self._kex_later is not None and self._keys_now(now):
                return DROP
        self.tx.in_ip = seg.ip_header
        try:
            options = parse_options(seg.options)
            self.tx.note_remote(seg, options)
            if seg.is_syn:
                return self._syn_in(seg, options, now)
            if self.state == State.ENO_RECEIVED:
                self._third_ack(options, now)
            if self.state == State.ENO_SENT:
                self._fall_back("non-syn segment before the syn-ack")
            if not self.is_translating:
                return self._plain(seg)
            return self._after_in(self.tx.translate_in(seg, options, now), now)
        except MalformedSegment:
            return DROP if self.is_translating else ACCEPT
        except ProtocolError as exc:
            return self._error(exc, seg, now, outbound=False)

    def _plain(self, seg: Segment) -> Verdict:
        if self.state is State.PLAIN and (seg.is_rst or seg.is_fin):
            self._set_state(Trigger.RESET if seg.is_rst else Trigger.FINISHED)
        elif self.state is State.CLOSED and seg.is_rst:
            self._set_state(Trigger.RESET)
        return ACCEPT

    # ------------------------------------------------------------------ handshake (RFC 8547 §4.6)

    def start_active(self, seg: Segment, now: float) -> Verdict:
        """Our stack opens: add our ENO option to its SYN (RFC 8548 §3.2)."""
        self.created_at = self.last_seen = now
        self.isn_local = seg.seq
        options = parse_options(seg.options)
        self.tx.note_local_syn(options)
        if seg.payload or any(kind == TCPOPT_FASTOPEN for kind, _ in options):
            # RFC 8547 §4.7: tcpcrypt defines no SYN data; a SYN with data or TFO stays plain.
            self._fall_back("syn carries data or tcp fast open")
            return ACCEPT
        if eno.eno_options(options):
            # Our side speaks TCP-ENO itself (a host-mode daemon or a kernel behind a gateway):
            # leave the connection to it, never encrypt twice.
            self.delegated = True
            self._fall_back("our side negotiates tcp-eno itself")
            return ACCEPT
        flow = self.flow
        no_resume, self._no_cache = self.config.flags_for(flow.remote_ip, flow.local_port, flow.remote_port)
        resume = None
        if not no_resume and self._cache is not None:
            resume = self._cache.take_for_offer(self.flow.remote_ip, self.config.teps, now)
        nonce = self.config.random_bytes(self.config.resume_nonce_len) if resume else b""
        # The whole offer, else the resumption suboption alone, else a fresh offer: whatever fits
        # beside our stack's options (40 bytes in all; a resumption suboption takes 18).
        kept = [(kind, raw) for kind, raw in options if kind != TCPOPT_NOP]
        for attempt in (resume, "resume-only", None):
            if attempt is None:
                self._syn_option, self._resume = eno.our_syn_option(self.config), None
            elif resume is None:
                continue
            else:
                config = self.config if attempt is resume else replace(self.config, teps=(resume.tep,))
                self._syn_option, self._resume = eno.our_syn_option(config, resume, nonce), resume
            self._syn_eno = self._syn_option.raw
            try:
                seg.options = serialize_options(kept + [(ENO_OPTION_KIND, self._syn_eno)])
                break
            except MalformedSegment:
                continue
        else:
            self._fall_back("no room for the eno option in the syn")
            return ACCEPT
        self._set_state(Trigger.SYN_SENT)
        return accept(serialize_segment(seg))

    def start_passive(self, seg: Segment, now: float) -> Verdict:
        """The peer opens: answer ENO if its SYN offers a TEP we accept (RFC 8547 §4.5)."""
        self.created_at = self.last_seen = now
        self.isn_remote = seg.seq
        options = parse_options(seg.options)
        self.tx.note_remote(seg, options)
        try:
            if seg.payload:
                raise eno.EnoFailed("peer syn carries data")  # RFC 8547 §4.7: tcpcrypt has no SYN data
            offer = eno.single_option(eno.eno_options(options))
            no_resume, self._no_cache = self.config.flags_for(
                self.flow.remote_ip, self.flow.local_port, self.flow.remote_port
            )
            cache, peer = self._cache, self.flow.remote_ip
            lookup = None
            if not no_resume and cache is not None:
                lookup = lambda tep, half: cache.take_for_answer(peer, tep, half, now)  # noqa: E731
            ours, self._resume = eno.answer_option(
                self.config, offer, lookup, lambda: self.config.random_bytes(self.config.resume_nonce_len)
            )
            self._syn_eno = ours.raw
            self._negotiated = eno.negotiate(self.config, ours, offer, self._resume)
        except eno.EnoFailed as exc:
            self._fall_back(f"peer syn: {exc}")
            return ACCEPT
        self._set_state(Trigger.SYN_RECEIVED)
        ahead = self._ahead
        if self._negotiated.resume is not None and ahead is not None and len(ahead) < self.config.max_sessions:
            ahead[self] = None  # its keys are made while we wait for the third ACK (prepare)
        self.tx.note_peer_mss(mss(options))
        seg.options = _toward_stack(options)
        return accept(serialize_segment(seg))

    def _syn_out(self, seg: Segment) -> Verdict:
        """Our SYN-ACK, or a retransmission of our SYN: the same ENO option (RFC 8547 §4.6)."""
        options = parse_options(seg.options)
        self.tx.note_local_syn(options)
        self.tx.note_local(seg, options, syn=True)
        # Our stack resending its SYN or SYN-ACK after ENO already succeeded (the peer's answer
        # crossed the retransmission): the option must not change (§4.6) either.
        resent_after_eno = self.is_translating and seg.seq == self.isn_local
        if self.state not in (State.ENO_SENT, State.ENO_RECEIVED) and not resent_after_eno:
            return ACCEPT
        if seg.is_ack:
            self.isn_local = seg.seq
        elif seg.seq != self.isn_local:
            return ACCEPT
        elif not resent_after_eno:
            self._syn_count += 1
            if self._syn_count > self.config.syn_retries_with_eno:
                # RFC 8547 §4.6: an active opener MAY drop ENO on a SYN retransmission, for paths
                # that drop SYNs carrying it.
                self._fall_back("syn retransmitted without eno")
                return ACCEPT
        try:
            kept = [(kind, raw) for kind, raw in options if kind != TCPOPT_NOP]
            seg.options = serialize_options(kept + [(ENO_OPTION_KIND, self._syn_eno)])
        except MalformedSegment:
            self._fall_back("no room for the eno option")
            return ACCEPT
        return accept(serialize_segment(seg))

    def _syn_in(self, seg: Segment, options: list[tuple[int, bytes]], now: float) -> Verdict:
        if self.state == State.ENO_SENT:
            enos = eno.eno_options(options)
            try:
                if self._negotiated is None:
                    # B's SYN-ACK, or the peer's SYN in a simultaneous open (§4.3).
                    assert self._syn_option is not None
                    self._negotiated = eno.negotiate(
                        self.config, self._syn_option, eno.single_option(enos), self._resume
                    )
                    self._simultaneous = not seg.is_ack
                    self.isn_remote = seg.seq
                    self.tx.note_peer_mss(mss(options))
                elif enos != [self._peer_syn_eno()]:
                    raise eno.EnoFailed("peer changed its eno option between syn and syn-ack")
            except eno.EnoFailed as exc:
                self._fall_back(f"peer {'syn-ack' if seg.is_ack else 'syn'}: {exc}")
                return ACCEPT
            if seg.is_ack:
                # Both ACK segments with ENO exist now (ours is about to follow): success (§4.6).
                self._eno_succeeded(now)
        elif not self.is_translating and self.state != State.ENO_RECEIVED:
            return ACCEPT
        # The SYN or SYN-ACK reaches our stack with the MSS clamped (docs/architecture.md: Sizes).
        seg.options = _toward_stack(options)
        return accept(serialize_segment(seg))

    def _peer_syn_eno(self) -> bytes:
        assert self._negotiated is not None
        return self._negotiated.eno_b if self._negotiated.role is Role.A else self._negotiated.eno_a

    def _third_ack(self, options: list[tuple[int, bytes]], now: float) -> None:
        """Host B: the first ACK after our SYN-ACK must carry ENO, else plain TCP (§4.6 rule 1)."""
        if not eno.eno_options(options):
            self._fall_back("first ack from the peer has no eno option")
            return
        self._eno_succeeded(now)

    def _eno_succeeded(self, now: float) -> None:
        """RFC 8547 §4.6: encryption is on; the TEP's key exchange starts (RFC 8548 §3.3)."""
        negotiated = self._negotiated
        assert negotiated is not None
        self.role = self.tx.role = negotiated.role
        self.key_role = negotiated.role
        self.tep = negotiated.tep
        self.tep_byte = negotiated.tep_byte
        self.eno_a, self.eno_b = negotiated.eno_a, negotiated.eno_b
        self._set_state(Trigger.ENO_OK)
        self._emit(EnoNegotiated(self.flow, TEP_NAMES[self.tep], self.role))
        self._open_streams()
        self.tx.need_nonsyn_eno = True
        if negotiated.resume is not None:
            self._resumed_keys(negotiated, now)
        elif self.role is Role.A:
            # Host A's stream starts with Init1; it rides on our stack's third ACK (docs/architecture.md),
            # or goes out at once after a simultaneous open, where no third ACK exists.
            assert self.send is not None
            self._private_key, public = self._new_private_key(self.tep, now)
            self._n_a = self.config.random_bytes(N_A_LEN)
            self._ciphers_offered = tuple(int(a) for a in self.config.aeads)
            self._init1 = serialize_init1(Init1(self._ciphers_offered, self._n_a, public))
            self.send.set_prefix(self._init1)
            if self._simultaneous:
                self.tx.init1_sent = True
                self.tx.send_prefix(now)

    def _open_streams(self) -> None:
        if self.isn_local is None or self.isn_remote is None:
            raise LocalProtocolError("streams opened before both isns are known")
        self.tx.open(self.isn_local, self.isn_remote, self._ooo_budget)

    # ------------------------------------------------------------------ key exchange (RFC 8548 §3.3)

    def init_message(self, message: bytes, now: float) -> None:
        """The peer's Init message: answer Init1 with Init2 (host B), or finish (host A)."""
        assert self.tep is not None and self.send is not None
        if self.state is not State.KEY_EXCHANGE:  # a reset closed it first: its key is erased
            raise RemoteProtocolError(f"init message in state {self.state.value}")
        if self.role is Role.B:
            init1 = parse_init1(message, self.tep)
            choice = next((a for a in self.config.aeads if int(a) in init1.sym_ciphers), None)
            if choice is None:
                # docs/protocol.md T4: no common AEAD; abort.
                raise RemoteProtocolError(f"init1 offers no aead we accept: {list(init1.sym_ciphers)}")
            private_key, public = self._new_private_key(self.tep, now)
            n_b = self.config.random_bytes(N_B_LEN)
            init2_bytes = serialize_init2(Init2(int(choice), n_b, public))
            self._kex_later = (choice, init1.n_a, message, init2_bytes, private_key, init1.pk_a)
            ahead = self._ahead
            if (ahead is not None and len(ahead) < self.config.max_sessions and self.recv is not None
                    and not self.recv.buf and not self.send.held):
                # Init2 goes out first and the keys follow, at the idle point (prepare) or with
                # this session's next packet, whichever comes first: nothing can use them before
                # A has Init2, and A's half of the key exchange then runs beside ours.
                ahead[self] = None
            else:
                self._finish_kex(now)  # bytes after Init1 (or our stack's held data) need them now
            self.send.set_prefix(init2_bytes)
            self.tx.send_prefix(now)
        else:
            init2 = parse_init2(message, self.tep)
            if init2.sym_cipher not in self._ciphers_offered:
                raise RemoteProtocolError(f"init2 chose aead {init2.sym_cipher:#06x}, which we did not offer")
            es = shared_secret(self.tep, self._private_key, init2.pk_b)
            self._derive(Aead(init2.sym_cipher), self._n_a, self._init1, message, es, now)
            self._private_key = None
            self.tx.release_held()

    @property
    def keys_due(self) -> bool:
        """Host B sent Init2 and derives its keys next (init_message, `_finish_kex`)."""
        return self._kex_later is not None

    def _finish_kex(self, now: float) -> None:
        """Host B's half of RFC 8548 §3.3 after its Init2: the shared secret, ss[0] and the keys.
        RemoteProtocolError: the peer's public key is refused (§5)."""
        later, self._kex_later = self._kex_later, None
        assert later is not None and self.tep is not None
        if self.state is not State.KEY_EXCHANGE:
            return  # reset meanwhile: no keys for it
        aead, n_a, init1, init2, private_key, peer_public = later
        self._derive(aead, n_a, init1, init2, shared_secret(self.tep, private_key, peer_public), now)

    def _keys_now(self, now: float) -> bool:
        """The keys still due after our Init2, before a packet of the session that is no reset
        is translated; a refused peer key aborts the connection, as it would have when Init1
        arrived (True: aborted, the packet is dropped)."""
        try:
            self._finish_kex(now)
        except RemoteProtocolError as exc:
            self._abort(str(exc), now)
            return True
        return False

    def _new_private_key(self, tep: Tep, now: float) -> tuple[PrivateKey, bytes]:
        """An ephemeral key of this connection's own (RFC 8548 §3.3) and its public encoding (§5):
        one the engine made ahead (KeyPool: used once, never again), else a new one."""
        if self._key_pool is not None:
            return self._key_pool.take_pair(self.config.key_factory, tep, now)
        key = self.config.key_factory.generate(tep)
        return key, public_bytes(tep, key)

    def _derive(self, aead: Aead, n_a: bytes, init1: bytes, init2: bytes, es: bytes, now: float) -> None:
        """RFC 8548 §3.3, §3.4: ss[0], mk[0], the traffic keys and the session ID."""
        assert self.tep is not None
        ss = session_secret(n_a, self.eno_a + self.eno_b, init1, init2, es)
        if self.config.secrets_log is not None:
            self.config.secrets_log(f"ES {n_a.hex()} {es.hex()}")
        if self._cache is not None and not self._no_cache:
            assert self.role is not None
            self._cache.store(self.flow.remote_ip, ss, self.tep, aead, self.role, now)
        self._keys_ready(KeySchedule(ss, b"", self.tep_byte, traffic_key_len(aead)), aead, now)

    def _resumed_keys(self, negotiated: eno.Negotiated, now: float) -> None:
        """RFC 8548 §3.5: keys and session ID from ss[i] and sn[i]; no Init messages; frames start
        at offset 0; each host keeps the key direction of its role in the original session."""
        resume = negotiated.resume
        assert resume is not None
        self.key_role = resume.original_role
        self.resumed = True
        if self.config.secrets_log is not None:
            self.config.secrets_log(f"SS {resume.resume_id.hex()} {resume.ss.hex()}")
        made, self._made_ahead = self._made_ahead, None
        keyed = made[1] if made is not None and made[0] is negotiated else _resumed_schedule(negotiated)
        if made is not None and made[0] is not negotiated:
            _wipe_keyed(made[1])
        self._keys[0] = keyed.keys
        self._keys_ready(keyed.schedule, resume.aead, now, keyed)

    def prepare(self, now: float) -> bool:
        """Key material ahead of need (Engine.prepare, while no packet waits): host B of a
        fresh session derives its keys after its Init2 went out (`_finish_kex`; else its next
        packet does); host B of a resumed session makes its key schedule, traffic keys and
        ciphers (RFC 8548 §3.5) from ss[i] and sn[i], both known since the peer's SYN, while it
        waits for the third ACK, which then finds them made (`_resumed_keys` makes them itself
        when this has not run). False: nothing to do."""
        if self._kex_later is not None:
            self._keys_now(now)
            return True
        negotiated = self._negotiated
        if (self.state is not State.ENO_RECEIVED or negotiated is None or negotiated.resume is None
                or self._made_ahead is not None):
            return False
        self._made_ahead = (negotiated, _resumed_schedule(negotiated))
        return True

    def _drop_made_ahead(self) -> None:
        if self._made_ahead is not None:
            _wipe_keyed(self._made_ahead[1])
            self._made_ahead = None

    def _keys_ready(self, schedule: KeySchedule, aead: Aead, now: float, keyed: _Keyed | None = None) -> None:
        assert self.send is not None and self.recv is not None
        self._schedule = schedule
        self.aead = aead
        if keyed is not None:
            self.send.cipher, self.recv.cipher = keyed.send, keyed.recv
        else:
            self.send.cipher = self.cipher(0, sending=True)
            self.recv.cipher = self.cipher(0, sending=False)
        self.session_id = schedule.session_id
        self._set_state(Trigger.KEYS)
        if self.send.prefix and self.send.prefix_acked:
            # A's Init1 was acknowledged by the very segment that brought Init2 (its ACK is read
            # before the keys exist): the retransmission timer has nothing left to do.
            self._timers.cancel(Timer.KEX)
        if self.config.keepalive:
            self._timers.arm(Timer.KEEPALIVE, now + self.config.keepalive)
        self._emit(SessionEstablished(self.flow, self.session_id.hex(), AEAD_NAMES[aead], self.resumed))

    def cipher(self, generation: int, sending: bool) -> FrameCipher:
        """The FrameCipher of key set `generation` for one direction (RFC 8548 §3.3, §3.8).

        Host A (of the session that made ss[0]) sends with k_ab, host B with k_ba.
        """
        assert self._schedule is not None and self.aead is not None
        keys = self._keys.get(generation)
        if keys is None:
            keys = self._keys[generation] = self._schedule.keys(generation)
        for old in [g for g in self._keys if g < generation - 1]:
            self._keys.pop(old).wipe()  # SHOULD delete old keys (§3.8); one older set may still be needed
        mine_ab = (self.key_role is Role.A) == sending
        return FrameCipher(self.aead, keys.k_ab if mine_ab else keys.k_ba)

    # ------------------------------------------------------------------ timers

    @property
    def timer_at(self) -> float | None:
        """The session's next deadline, or None."""
        timers = self._timers
        return min(timers.values()) if timers else None

    def handle_timer(self, now: float) -> None:
        """Run the session's due timers."""
        handlers = {
            Timer.KEX: self._on_kex, Timer.TAIL: self._on_tail,
            Timer.KEEPALIVE: self._on_keepalive, Timer.REPLAY: self.tx.on_replay,
        }
        for timer in self._timers.take_due(now):
            if self.is_translating:
                handlers[timer](now)

    def _on_kex(self, now: float) -> None:
        """Retransmit an unacknowledged Init message; give up after `kex_retries`."""
        if self.send is None or self.send.prefix_acked:
            return
        if self.tx.kex_tries > self.config.kex_retries:
            self._abort("key exchange timed out", now)
            return
        self.tx.send_prefix(now)

    def _on_tail(self, now: float) -> None:
        """Retransmit frames that exist only on the wire (empty rekey frames, RFC 8548 §3.8):
        our stack knows nothing of them, so it never retransmits them."""
        send = self.send
        assert send is not None
        tail = send.wire_only_unacked()
        if not tail:
            self._tail_tries = 0
            return
        self._tail_tries += 1
        if self._tail_tries > self.config.kex_retries:
            self._abort("peer does not acknowledge our frames", now)
            return
        self.tx.inject_frames(tail)
        self._timers.arm(Timer.TAIL, now + self.config.kex_timeout * (2 ** (self._tail_tries - 1)))

    def _on_keepalive(self, now: float) -> None:
        """RFC 8548 §3.9: probe liveness by rekeying; the peer must answer with a rekey frame."""
        send, recv = self.send, self.recv
        assert send is not None and recv is not None
        if self.state not in _KEYED:
            return  # closed (a reset): nothing to probe, and the keys are erased
        if now - self.last_seen >= self.config.keepalive and recv.gen == send.gen and not send.fin_framed:
            self._rekey_now(now)
        self._timers.arm(Timer.KEEPALIVE, max(now, self.last_seen) + self.config.keepalive)

    # ------------------------------------------------------------------ rekeying (RFC 8548 §3.8)

    def _rekey_now(self, now: float) -> None:
        """Start a rekey and send an empty frame with rekey = 1 at once (wire only)."""
        self.tx.start_rekey()
        assert self.send is not None
        self.tx.inject_frames(self.send.new_frame(b"", False))
        if Timer.TAIL not in self._timers:
            self._tail_tries = 0
            self._timers.arm(Timer.TAIL, now + self.config.kex_timeout)

    def _after_out(self) -> None:
        """Our stack sent a FIN: once it is framed, the session is closing."""
        if self.send is not None and self.send.fin_framed:
            self._set_state(Trigger.FIN)

    def _after_in(self, result: Translated, now: float) -> Verdict:
        """Act on what an inbound packet did: follow the peer's rekey, move through closing."""
        if result.peer_rekeyed:
            self._peer_rekeyed(now)
        if result.closing and self.state is State.ENCRYPTING:
            self._set_state(Trigger.FIN)
        if result.finished and self.state is State.CLOSING:
            self._set_state(Trigger.FINISHED, now)
            self._emit(SessionClosed(self.flow, "fin both ways"))
        return result.verdict

    def _peer_rekeyed(self, now: float) -> None:
        """The peer moved its generation up: answer while it is ahead of us (RFC 8548 §3.8)."""
        send, recv = self.send, self.recv
        assert send is not None and recv is not None
        if recv.gen > send.gen and send.fin_framed:
            send.gen = recv.gen  # after our FIN we send nothing more
            send.cipher = self.cipher(send.gen, sending=True)
        while recv.gen > send.gen:
            self._rekey_now(now)

    # ------------------------------------------------------------------ resets, aborts, closing

    def _rst_out(self, seg: Segment, now: float) -> Verdict:
        if self.is_translating and self.send is not None and self.recv is not None:
            plain = to_offset(seg.seq, self.send.base, self.send.plain_next)
            seg.seq = to_seq(self.send.plain_to_wire(plain), self.send.base)
            if seg.is_ack:
                seg.ack = to_seq(self.recv.ack_to_wire(self.recv.plain_next), self.recv.base)
            seg.payload = b""
            self._set_state(Trigger.RESET, now)
            self._emit(SessionClosed(self.flow, "reset by the local stack"))
            return accept(serialize_segment(seg))
        self._set_state(Trigger.RESET, now)
        return ACCEPT

    def _rst_in(self, seg: Segment, now: float) -> Verdict:
        """An RST from the wire: taken only at exactly the next expected wire sequence number (or
        the acknowledgment we last sent); inside the window a challenge ACK, else dropped (RFC 5961
        §3.2). A taken RST reaches our stack at exactly its next expected sequence number."""
        assert self.send is not None and self.recv is not None
        recv = self.recv
        wire = to_offset(seg.seq, recv.base, recv.wire_next)
        rcv_nxt = recv.wire_next + (recv.fin_seen == recv.wire_next)
        check = check_rst(wire, (rcv_nxt, recv.ack_floor), rcv_nxt, self.tx.local_window << self.tx.window_shift)
        if check is RstCheck.CHALLENGE:
            return self._challenge(now)
        if check is RstCheck.DROP:
            return DROP
        seg.seq = to_seq(self.recv.plain_next, self.recv.base)
        if seg.is_ack:
            send = self.send
            seg.ack = to_seq(send.ack_to_plain(to_offset(seg.ack, send.base, send.acked_wire)), send.base)
        seg.payload = b""
        self._set_state(Trigger.RESET, now)
        self._emit(SessionClosed(self.flow, "reset by the peer"))
        return accept(serialize_segment(seg))

    def _challenge(self, now: float) -> Verdict:
        """A challenge ACK toward the peer (rate limited, RFC 5961 §7); the segment is dropped."""
        assert self.send is not None
        if self._challenges.allow(now):
            self.tx.inject_wire(self.send.wire_next, b"", TCP_ACK)
        return DROP

    def _error(self, exc: ProtocolError, seg: Segment, now: float, outbound: bool) -> Verdict:
        if isinstance(exc, LocalProtocolError):
            raise exc
        if exc.disposition == Disposition.DROP_SEGMENT:
            return DROP
        if not self.is_translating:
            # Before encryption starts every failure falls back to plain TCP (RFC 8547 §4.6).
            if self.state in (State.ENO_SENT, State.ENO_RECEIVED):
                self._fall_back(str(exc))
            return ACCEPT
        self._abort(str(exc), now)
        return DROP

    def abort(self, reason: str, now: float) -> None:
        """Abort from outside (the daemon stops): RST toward both ends."""
        if self.is_translating:
            self._abort(reason, now)

    def _abort(self, reason: str, now: float) -> None:
        """RST toward the peer and toward the local stack (RFC 8548 §3.6: an error, never EOF)."""
        logger.warning("%s: aborting: %s", self.flow, reason)
        if self.send is not None and self.recv is not None:
            self.tx.inject_wire(self.send.wire_next, b"", TCP_RST | TCP_ACK)
            self.tx.inject_local_rst()
        self.closed_at = None  # the abort's time counts, not an earlier end
        self._set_state(Trigger.ABORT, now)
        self._timers.clear()
        self.wipe_secrets()
        self._emit(SessionAborted(self.flow, reason))

    def forget(self) -> None:
        """The engine dropped the session from its table: its secrets are wiped, and the references
        back to it (its translator's and its timers') are cut, so that reference counting frees it
        at once, not the cycle collector, whose passes over every live object cost CPU per
        connection."""
        self.wipe_secrets()
        self._timers.detach()
        self.tx.detach()

    def wipe_secrets(self) -> None:
        """Best-effort erasure when the session ends: traffic and master keys zeroed, private key,
        ciphers and resumption secret dropped (README: Security model)."""
        for keys in self._keys.values():
            keys.wipe()
        self._keys.clear()
        if self._schedule is not None:
            self._schedule.wipe()
            self._schedule = None
        self._private_key = None
        self._kex_later = None
        self._resume = None
        self._drop_made_ahead()
        if self.send is not None and self.recv is not None:
            self.send.cipher = self.recv.cipher = None
            self.recv.ooo.clear()  # the daemon-wide budget gets its bytes back

    def icmp_in(self, message: IcmpError) -> Verdict:
        """An ICMP error from the network about one of our wire packets, toward our stack: the
        quoted sequence number in plain space, so that our stack accepts it (docs/architecture.md); for a
        too-big report (RFC 1191 / RFC 4443 §3.2) also the MTU less the frame overhead.

        Host mode shares one route cache between our stack and the wire packets: once the stack
        believes MTU - 20, the kernel would refuse our wire packets of MTU bytes (and report that
        over lo, again and again, 20 bytes lower each time). So from the first report on, data
        packets of this session leave through the injector, which the shell sends with path-MTU
        discovery in probe mode (checked against the device MTU only), and a later report from our
        own kernel about one of our wire packets is dropped, not passed on.
        """
        send = self.send
        if not self.is_translating or send is None:
            return ACCEPT
        if message.is_too_big and self.pmtu is not None and message.src == self.flow.local_ip:
            return DROP  # our kernel about a wire packet sent before the switch: stale
        *_, at, seq = message.quoted_tcp
        wire = to_offset(seq, send.base, send.acked_wire)
        if not send.acked_wire <= wire <= send.wire_next:
            return DROP  # not about data in flight (Linux tcp_v4_err: snd_una <= seq <= snd_nxt)
        plain = send.wire_to_plain(wire)
        quote = bytearray(message.quote)
        struct.pack_into("!I", quote, at, to_seq(plain, send.base))
        message.quote = bytes(quote)
        if message.is_too_big:
            # Frames already logged keep their size; resent, they are split to fit the new path
            # MTU (IP and TCP headers; segments budget their options within wire_mss). Linux's
            # floors: IPv4 min_pmtu 552, IPv6 1280 (RFC 8200 §5).
            v4 = len(message.src) == 4
            mtu = max(message.mtu, MIN_PMTU_V4 if v4 else MIN_PMTU_V6)
            tx = self.tx
            tx.wire_mss = min(tx.wire_mss, mtu - (20 if v4 else 40) - 20)
            tx.pmtu = mtu if tx.pmtu is None else min(tx.pmtu, mtu)
            message.mtu = max(mtu - FRAME_OVERHEAD, 68 if v4 else 1280)
        return accept(serialize_icmp_error(message))

    def icmp_out(self, message: IcmpError) -> Verdict:
        """An ICMP error from this host's kernel about a packet we decrypted, toward the wire
        (a gateway whose inside host is unreachable, say): its quote would carry plaintext. Only
        the quoted IP header and the first 8 TCP bytes (ports, sequence number) go out, the
        sequence number in wire space (RFC 792 asks for no more than that)."""
        recv = self.recv
        if not self.is_translating or recv is None:
            return ACCEPT
        *_, at, seq = message.quoted_tcp
        quote = bytearray(message.quote[: at + 4])
        plain = to_offset(seq, recv.base, recv.plain_next)
        struct.pack_into("!I", quote, at, to_seq(recv.plain_to_wire(plain), recv.base))
        message.quote = bytes(quote)
        return accept(serialize_icmp_error(message))

    # ------------------------------------------------------------------ reporting

    def info(self) -> dict[str, object]:
        """The session as a JSON-ready dict (README: `sessions --json`); no secrets."""
        return {
            "local": self.flow.local,
            "remote": self.flow.remote,
            "state": self.state.value,
            "role": self.role.value if self.role is not None else None,
            "tep": TEP_NAMES[self.tep] if self.tep is not None and self.state != State.PLAIN else None,
            "aead": AEAD_NAMES[self.aead] if self.aead is not None else None,
            "session_id": self.session_id.hex() if self.session_id is not None else None,
            "resumed": self.resumed,
            "peer_app_aware": self._negotiated.peer_a_bit if self._negotiated else False,
            "bytes_in": self.tx.bytes_in,
            "bytes_out": self.tx.bytes_out,
            "rekeys": self.tx.rekeys,
            "redelivered": self.tx.redelivered,
            "replayed": self.tx.replayed,
            "generation": [self.send.gen, self.recv.gen] if self.send and self.recv else [0, 0],
            "held_bytes": self.held_bytes(),
        }

    def held_bytes(self) -> int:
        """Bytes this session holds for either side (plaintext before keys, out-of-order wire
        bytes with their overhead, plaintext kept for redelivery): README, Memory bounds."""
        held = 0
        if self.send is not None:
            held += sum(len(data) for _, data, _ in self.send.held)
        if self.recv is not None:
            held += self.recv.ooo.cost + sum(len(data) for _, data in self.recv.replay)
        return held


class _Keyed:
    """A session's key schedule with key set 0 and its two ciphers (RFC 8548 §3.3, §3.6).

    A plain class: a NamedTuple's constructor stays interpreted when compiled."""

    __slots__ = ("schedule", "keys", "send", "recv")

    def __init__(self, schedule: KeySchedule, keys: TrafficKeys, send: FrameCipher, recv: FrameCipher) -> None:
        self.schedule = schedule
        self.keys = keys
        self.send = send
        self.recv = recv

    def __repr__(self) -> str:
        return "_Keyed()"


def _resumed_schedule(negotiated: eno.Negotiated) -> _Keyed:
    """The keys of a resumed session (RFC 8548 §3.5): mk[0] from ss[i] and sn[i]; we send with
    k_ab if we were host A of the session that made ss[0], else with k_ba."""
    resume = negotiated.resume
    assert resume is not None
    schedule = KeySchedule(resume.ss, negotiated.sn, negotiated.tep_byte, traffic_key_len(resume.aead))
    keys = schedule.keys(0)
    ours, theirs = (keys.k_ab, keys.k_ba) if resume.original_role is Role.A else (keys.k_ba, keys.k_ab)
    return _Keyed(schedule, keys, FrameCipher(resume.aead, ours), FrameCipher(resume.aead, theirs))


def _wipe_keyed(keyed: _Keyed) -> None:
    keyed.schedule.wipe()
    keyed.keys.wipe()


def _toward_stack(options: list[tuple[int, bytes]]) -> bytes:
    """A SYN's options as our side gets them: the MSS lowered by a frame's overhead (docs/architecture.md: Sizes),
    and the peer's ENO option removed, which is ours to answer, not our side's."""
    kept = [(kind, raw) for kind, raw in options if kind not in (ENO_OPTION_KIND, TCPOPT_NOP)]
    return serialize_options(clamp_mss(kept, FRAME_OVERHEAD))
