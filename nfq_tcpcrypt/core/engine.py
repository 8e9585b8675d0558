"""Engine: the session table, dispatch of packets to sessions, timers and counters (docs/architecture.md)."""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Final

from .config import Configuration
from .constants import TCP_ACK, TCP_RST, TCP_SYN
from .errors import MalformedSegment
from .events import Event, SessionExpired
from .flow import Direction, FlowKey, as_flow
from .kex import KeyPool
from .outoforder import Budget
from .resumption import ResumptionCache, SecretCache
from .seqmap import to_seq
from .session import Session, State
from .tombstones import Tombstone, Tombstones
from .verdict import ACCEPT, ACCEPT_ENCRYPTED, DROP, UNKNOWN, Action, Injection, PacketInfo, Verdict, accept
from .wire.icmp import parse_icmp_error
from .wire.ip import tcp_ports_of
from .wire.tcp import Segment, new_segment, parse_segment, serialize_segment

logger = logging.getLogger(__name__)

SWEEP_INTERVAL: Final = 1.0
SWEEP_SLICE: Final = 128
"""Sessions one step of a sweep looks at: a big table is swept in steps, with the packets that
wait handled between them (a table of 65,536 sessions took about 0.6 s in one piece here)."""
_INBOUND: Final = Direction.INBOUND


class Counts(dict[str, int]):
    """The engine's counters: a dict in which a name never counted reads 0, as in
    `collections.Counter`, whose item methods are Python-level (every packet's count went through
    them; a dict subclass that only adds `__missing__` keeps dict's own)."""

    def __missing__(self, key: str) -> int:
        return 0


class Engine:
    """The sans-I/O core the shell talks to (docs/architecture.md: Layers): packets in, verdicts and packets out."""

    def __init__(self, config: Configuration | None = None) -> None:
        self.config = config or Configuration()
        self.counters = Counts()
        self._sessions: dict[FlowKey, Session] = {}
        self._unkeyed: OrderedDict[FlowKey, Session] = OrderedDict()  # eviction candidates, oldest first
        # Sessions that ended (closed, aborted, refused) and linger, in the order they ended: at
        # max_sessions the oldest of them makes room (after sessions without keys), so a high
        # connection rate never fills the table with finished connections.
        self._ended: OrderedDict[FlowKey, Session] = OrderedDict()
        # Sessions opened by the peer's SYN on the 4-tuple of a tombstone: until our stack answers
        # with a SYN-ACK (a new connection of its own), anything else of that 4-tuple fails closed.
        self._reopened: dict[FlowKey, Tombstone | None] = {}
        self._events: deque[Event] = deque()
        self._inject: list[Injection] = []
        # Every session's emit and inject, made once (a bound method is an object per use).
        self._emit: Callable[[Event], None] = self._events.append
        self._add_injection: Callable[[Injection], None] = self._inject.append
        self._next_sweep: float | None = None
        # The sweep under way: the flows it has still to look at (last first), the earliest
        # expiry it saw, and when its last step ran (the next step is due then).
        self._sweep_left: list[FlowKey] = []
        self._sweep_seen: float | None = None
        self._sweep_step_at = 0.0
        # Sessions that armed a timer since they were last seen with none, oldest first:
        # get_timer and handle_timer look at these only (a table of thousands of idle or lingering
        # sessions costs nothing per packet).
        self._armed: dict[Session, None] = {}
        # Sessions with key material to make before their next packet needs it (Session.prepare),
        # oldest first; at most max_sessions (an older one left out makes its keys when needed).
        self._ahead: dict[Session, None] = {}
        self.cache: SecretCache = ResumptionCache(
            self.config.resume_cache_size, self.config.resume_ttl, self.config.resume_per_peer
        )
        self.tombstones = Tombstones(self.config.max_tombstones, self.config.tombstone_ttl)
        self.ooo_budget = Budget(self.config.ooo_total_limit)
        self.keys = KeyPool()

    # ------------------------------------------------------------------ packets

    def process(self, packet: bytes, direction: Direction, now: float, encrypted: bool = False,
                info: PacketInfo = UNKNOWN) -> Verdict:
        """Handle one queued IP packet travelling in `direction`; return its verdict.

        `encrypted`: the shell knows (conntrack's mark) that the packet's connection negotiated
        encryption, whatever the table says, after a restart say. `info`: what the queue knows of
        the packet (a GSO super-packet, a checksum the kernel vouches for). Remote-caused problems
        become verdicts and events; only LocalProtocolError (a bug) escapes.
        """
        counters = self.counters
        counters["packets"] += 1
        if len(packet) >= 40 and packet[9 if packet[0] >> 4 == 4 else 6] in (1, 58):
            return self._icmp(packet, direction)
        inbound = direction is _INBOUND
        try:
            # Wire packets are checked: we rewrite checksums, so we must not launder corruption.
            # What the kernel verified, or will fill in itself, needs no second look.
            seg = parse_segment(packet, verify_checksum=inbound and not info.checksum_trusted)
        except MalformedSegment as exc:
            return self._malformed(packet, inbound, encrypted, now, exc)
        if info.gso:
            counters["super_packets"] += 1
            seg.gso = True
            seg.kernel_checksum = not inbound  # segmented in software, each segment checksummed
        # A plain tuple finds the FlowKey it equals (a NamedTuple hashes as its tuple); the
        # FlowKey itself is made only where a session may start or a tombstone decide.
        key = (seg.dst, seg.dport, seg.src, seg.sport) if inbound else (seg.src, seg.sport, seg.dst, seg.dport)
        session: Session | None = self._sessions.get(key)  # type: ignore[call-overload]
        try:
            if session is None or self._reopened or seg.flags & TCP_SYN:
                flow = as_flow(key)
                verdict = self._unusual(flow, session, seg, direction, now, encrypted)
                if verdict is not None:
                    return verdict
                assert session is not None
            if session.state is State.REFUSED:
                return DROP
            keyed = session.keys_ready
            mark = len(self._inject)
            verdict = session.inbound(seg, now) if inbound else session.outbound(seg, now)
        except Exception:
            self._fault(key, now)
            raise
        if not keyed and len(self._inject) - mark > 1 and (session.keys_ready or session.keys_due):
            self._drop_repeated_ack(mark)
        if session.required and session.state is State.PLAIN and not session.delegated:
            return self._refuse(session, seg, direction, now)
        if session.closed_at is not None:
            self._schedule_sweep(session.closed_at + self.config.session_linger)
            if session.flow not in self._ended:
                self._ended[session.flow] = session
        if verdict.packet is not None:
            counters["rewritten"] += 1
        if not verdict.encrypted and session.tx.send is not None and verdict.action is Action.ACCEPT:
            return ACCEPT_ENCRYPTED if verdict.packet is None else accept(verdict.packet, True)
        return verdict

    def _malformed(self, packet: bytes, inbound: bool, encrypted: bool, now: float, exc: MalformedSegment) -> Verdict:
        """A packet the codecs refuse. Of a connection that is (or was) encrypted it is dropped:
        passed on, its payload would reach the stack untranslated, and a host's stack takes some of
        what our codecs refuse (an IPv6 extension header before TCP, RFC 8200 §4), so an on-path
        attacker could deliver plaintext of their own, or our stack's bytes leave unencrypted
        (README: Security model). Of any other connection it passes untouched (counted): a peer
        without TCP-ENO keeps working."""
        counters = self.counters
        counters["malformed"] += 1
        found = tcp_ports_of(packet)
        if encrypted or (found is not None and self._was_encrypted(found, inbound, now)):
            counters["malformed_dropped"] += 1
            logger.debug("dropping a packet of an encrypted connection the codec rejects: %s", exc)
            return DROP
        logger.debug("passing a packet the codec rejects: %s", exc)
        return ACCEPT

    def _was_encrypted(self, found: tuple[bytes, int, bytes, int], inbound: bool, now: float) -> bool:
        """Whether the connection of a packet's (src, sport, dst, dport) negotiated encryption: its
        session translates or ended so, or a tombstone remembers it."""
        src, sport, dst, dport = found
        flow = FlowKey(dst, dport, src, sport) if inbound else FlowKey(src, sport, dst, dport)
        session = self._sessions.get(flow)
        if session is None:
            return self.tombstones.get(flow, now) is not None
        return session.is_translating or session.state is State.ABORTED or session.state is State.REFUSED

    def _fault(self, key: tuple[bytes, int, bytes, int], now: float) -> None:
        """A fault of ours halfway through a packet (a bug) may leave a session's byte spaces out of
        step: the flow's encrypted connection is reset toward both ends rather than carried on
        (fail closed, README: Security model); the caller drops the packet and counts it."""
        self.counters["internal_errors"] += 1
        session: Session | None = self._sessions.get(key)  # type: ignore[call-overload]
        if session is not None and session.is_translating and session.state is not State.ABORTED:
            session.abort("internal error", now)
            self._schedule_sweep(now + self.config.session_linger)

    def _unusual(self, flow: FlowKey, session: Session | None, seg: Segment, direction: Direction, now: float,
                 encrypted: bool) -> Verdict | None:
        """The packets `process` does not simply hand to their session: a SYN, a packet without a
        session (untracked, or of a once encrypted connection), a 4-tuple a SYN reopened. Returns
        the verdict, or None when the session takes the packet as usual."""
        if self._reopened and flow in self._reopened:
            if session is None:
                del self._reopened[flow]  # the new session left the table: the tombstone decides again
            else:
                verdict = self._reopening(flow, seg, direction)
                if verdict is not None:
                    return verdict
        if session is None and (encrypted or len(self.tombstones)):
            tombstone = self.tombstones.get(flow, now)
            if tombstone is not None or encrypted:
                if not (seg.is_syn and not seg.is_ack):
                    return self._fail_closed(flow, seg, direction, tombstone)
                if direction is Direction.OUTBOUND:
                    self.tombstones.discard(flow)  # our stack opens anew: its old connection is gone
                else:
                    # The peer opens anew on this 4-tuple (its port came round again): a new
                    # connection, but the tombstone stays until our stack shows it has no old one.
                    verdict = self._open(flow, seg, direction, now)
                    if flow in self._sessions:
                        self._reopened[flow] = tombstone
                    return verdict
        if seg.is_syn and not seg.is_ack and (session is None or _is_new_syn(session, seg, direction)):
            return self._open(flow, seg, direction, now)
        if session is None:
            if self.config.policies and self._required(flow):
                # A connection that must be encrypted and has no session (it was evicted, or the
                # table was full when it opened): it must not go on in plaintext.
                self.counters["refused_untracked"] += 1
                return DROP
            self.counters["untracked"] += 1
            return ACCEPT
        return None

    def _drop_repeated_ack(self, mark: int) -> None:
        """The keys came with this packet, or at host B follow it (an Init message was consumed,
        RFC 8548 §3.3; Session.init_message), and the translator's pure ACK of it closes what the
        step injected: it goes when a segment injected in the same step toward the peer already
        carries the same acknowledgment, window and options (B's Init2; A's first frame of data
        its stack wrote before the keys existed). It would tell the peer nothing new (a duplicate
        ACK, RFC 5681 §2) and cost both daemons a packet per connection."""
        last = self._inject[-1]
        if last.direction is not Direction.OUTBOUND:
            return
        ack = _ack_fields(last.packet)
        if ack is None or ack[0] != TCP_ACK or ack[2]:
            return
        for earlier in self._inject[mark:-1]:
            if earlier.direction is not Direction.OUTBOUND:
                continue
            seg = _ack_fields(earlier.packet)
            if seg is not None and seg[0] & TCP_ACK and not seg[0] & TCP_RST and seg[1] == ack[1]:
                self._inject.pop()
                self.counters["repeated_acks_dropped"] += 1
                return

    def _refuse(self, session: Session, seg: Segment, direction: Direction, now: float) -> Verdict:
        """Policy `require`: the connection cannot be encrypted, so it is reset toward both ends
        and the packet dropped; later packets of it are dropped too (README: Security model)."""
        session.refuse(now)
        self._schedule_sweep(now + self.config.session_linger)
        self.counters["refused_plain"] += 1
        logger.warning("%s: encryption required but not possible: connection reset", session.flow)
        flow = session.flow
        local, remote = (flow.local_ip, flow.local_port), (flow.remote_ip, flow.remote_port)
        sender, receiver = (local, remote) if direction is Direction.OUTBOUND else (remote, local)
        toward_sender = Direction.INBOUND if direction is Direction.OUTBOUND else Direction.OUTBOUND
        size = len(seg.payload) + seg.is_syn + seg.is_fin
        if seg.is_rst:
            return DROP
        # RFC 9293 §3.10.7.1: the reset that answers `seg`, toward its sender ...
        if seg.is_ack:
            answer = new_segment(receiver[0], sender[0], receiver[1], sender[1], seg.ack, 0, TCP_RST, 0)
        else:
            answer = new_segment(receiver[0], sender[0], receiver[1], sender[1], 0, (seg.seq + size) & 0xFFFFFFFF,
                                 TCP_RST | TCP_ACK, 0)
        self._inject.append(Injection(serialize_segment(answer), toward_sender))
        # ... and one in the sender's name toward the receiver, which already holds the connection.
        if seg.is_ack:
            seq = (seg.seq + seg.is_syn) & 0xFFFFFFFF
            onward = new_segment(sender[0], receiver[0], sender[1], receiver[1], seq, seg.ack, TCP_RST | TCP_ACK, 0)
            self._inject.append(Injection(serialize_segment(onward), direction))
        return DROP

    def _fail_closed(self, flow: FlowKey, seg: Segment, direction: Direction, tombstone: Tombstone | None) -> Verdict:
        """A packet of a once encrypted connection that has no session (README: Security model).

        From our stack: reset it (an RST at the sequence number it acknowledges, RFC 9293 §3.10.7.3)
        and the peer (at our next wire sequence number, when known), and drop the packet, so that
        none of its bytes leaves in plaintext. From the wire: drop it, so that no unauthenticated
        byte reaches our stack.
        """
        if direction is Direction.INBOUND:
            self.counters["fail_closed_dropped"] += 1
            return DROP
        self.counters["fail_closed_reset"] += 1
        if seg.is_rst:
            return DROP
        if seg.is_ack:
            rst = new_segment(flow.remote_ip, flow.local_ip, flow.remote_port, flow.local_port, seg.ack, 0, TCP_RST, 0)
            self._inject.append(Injection(serialize_segment(rst), Direction.INBOUND))
        if tombstone is not None and tombstone.wire_seq is not None:
            rst = new_segment(flow.local_ip, flow.remote_ip, flow.local_port, flow.remote_port, tombstone.wire_seq,
                              0, TCP_RST, 0)
            self._inject.append(Injection(serialize_segment(rst), Direction.OUTBOUND))
        logger.info("%s: packet of an encrypted connection without a session: reset, dropped", flow)
        return DROP

    def _reopening(self, flow: FlowKey, seg: Segment, direction: Direction) -> Verdict | None:
        """A packet of a 4-tuple whose tombstone a SYN from the wire reopened; None: carry on.

        Our stack's SYN-ACK says it took the SYN as a new connection (it holds no old one), and so
        does a SYN of its own: the tombstone goes. Anything else before that, from either side, may
        belong to the old encrypted connection our stack may still hold, so it fails closed as
        without the new session (README: Security model); the peer's SYN and its retransmissions go
        on to the session.
        """
        tombstone = self._reopened[flow]
        if seg.is_syn and not seg.is_ack and direction is Direction.INBOUND:
            return None
        if direction is Direction.OUTBOUND and seg.is_syn:
            del self._reopened[flow]
            self.tombstones.discard(flow)
            return None
        return self._fail_closed(flow, seg, direction, tombstone)

    def _icmp(self, packet: bytes, direction: Direction) -> Verdict:
        """An ICMP error quoting a segment of a session: translate it between the byte spaces.

        INBOUND errors quote one of our wire packets (a router's report); OUTBOUND ones come from
        this host's own kernel and quote a decrypted packet, plaintext that must not leave as is.
        """
        try:
            message = parse_icmp_error(packet)
            if message is None:
                return ACCEPT
            src, dst, sport, dport, _, _ = message.quoted_tcp
        except MalformedSegment:
            return ACCEPT
        if direction is Direction.INBOUND:
            session = self._sessions.get(FlowKey(src, sport, dst, dport))
            verdict = session.icmp_in(message) if session is not None else ACCEPT
        else:
            session = self._sessions.get(FlowKey(dst, dport, src, sport))
            verdict = session.icmp_out(message) if session is not None else ACCEPT
        if session is not None:
            self.counters["icmp_rewritten" if verdict.packet is not None else "icmp_" + verdict.action.value] += 1
        return verdict

    def _open(self, flow: FlowKey, seg: Segment, direction: Direction, now: float) -> Verdict:
        action = None
        if self.config.policies:
            action = self.config.policy_action(flow.remote_ip, flow.local_port, flow.remote_port)
        if action == "exclude":
            self._sessions.pop(flow, None)
            self.counters["excluded"] += 1
            return ACCEPT
        verdict = self._start(flow, seg, direction, now)
        session = self._sessions.get(flow)
        if action == "require":
            if session is None:  # no room in the table: it cannot be encrypted
                self.counters["refused_plain"] += 1
                return DROP
            session.required = True
            if session.state is State.PLAIN and not session.delegated:
                return self._refuse(session, seg, direction, now)
        return verdict

    def _required(self, flow: FlowKey) -> bool:
        return self.config.policy_action(flow.remote_ip, flow.local_port, flow.remote_port) == "require"

    def _start(self, flow: FlowKey, seg: Segment, direction: Direction, now: float) -> Verdict:
        if flow not in self._sessions and len(self._sessions) >= self.config.max_sessions and not self._evict(now):
            self.counters["table_full"] += 1
            return ACCEPT
        old = self._sessions.get(flow)
        if old is not None:
            old.forget()  # port reuse: the old connection is over
            self._ended.pop(flow, None)
        session = Session(flow, self.config, self._emit, self._add_injection, self.cache, self.ooo_budget,
                          self._armed, self.keys, self._ahead)
        self._sessions[flow] = session
        self._unkeyed.pop(flow, None)
        self._unkeyed[flow] = session
        self.counters["connections"] += 1
        self._schedule_sweep(now + min(self.config.idle_timeout, self.config.embryonic_timeout))
        try:
            if direction is Direction.OUTBOUND:
                return session.start_active(seg, now)
            return session.start_passive(seg, now)
        except MalformedSegment as exc:
            session.pass_plain()
            self.counters["malformed"] += 1
            logger.debug("%s: syn the codec rejects, passing as plain: %s", flow, exc)
            return ACCEPT

    def _evict(self, now: float) -> bool:
        """Make room: drop the oldest session that holds no keys, else the oldest one that ended
        (closed, aborted or refused, lingering: it leaves a tombstone, as at the end of its linger);
        never a live keyed one."""
        while self._unkeyed:
            flow, session = self._unkeyed.popitem(last=False)
            if self._sessions.get(flow) is session and session.send is None:
                del self._sessions[flow]
                self._ended.pop(flow, None)
                self._reopened.pop(flow, None)
                session.forget()
                self.counters["evicted_embryonic"] += 1
                return True
        while self._ended:
            flow, session = self._ended.popitem(last=False)
            if self._sessions.get(flow) is session and session.closed_at is not None:
                del self._sessions[flow]
                self._unkeyed.pop(flow, None)
                self._reopened.pop(flow, None)
                self._bury(session, now)
                session.forget()
                self._events.append(SessionExpired(flow))
                self.counters["evicted_ended"] += 1
                return True
        return False

    # ------------------------------------------------------------------ work ahead of need

    def prepare_wanted(self, now: float) -> bool:
        """Whether `prepare` has work: the loop calls it only when no packet waits."""
        cache = self.cache  # a worker's is the supervisor's (shell/workers.py): filled there, on demand
        return (bool(self._ahead) or (isinstance(cache, ResumptionCache) and cache.wanted)
                or self.keys.wanted(now) is not None)

    def prepare(self, now: float) -> bool:
        """Do one piece of work ahead of need, off the packet path, in this order: one session's
        keys its next packet will need (Session.prepare: host B's keys of a fresh session after
        its Init2, of a resumed one between its SYN-ACK and the peer's third ACK), one resumption
        cache entry's next secrets and identifiers (ResumptionCache.fill_one), one ephemeral key
        for the pool (KeyPool). Each piece is small (tens of microseconds), so a packet that
        arrives meanwhile waits at most one. Work not done ahead is done when it is needed. False
        when there was nothing to do."""
        ahead, sessions = self._ahead, self._sessions
        while ahead:
            session = next(iter(ahead))
            del ahead[session]
            if sessions.get(session.flow) is session and session.prepare(now):
                return True
        cache = self.cache
        if isinstance(cache, ResumptionCache) and cache.fill_one():
            return True
        return self.keys.fill(self.config.key_factory, now)

    # ------------------------------------------------------------------ outputs and timers

    def segments_to_inject(self) -> list[Injection]:
        """Packets the shell must send through its marked raw sockets, in order."""
        if not self._inject:
            return []
        out, self._inject[:] = list(self._inject), []
        self.counters["injected"] += len(out)
        return out

    def get_timer(self) -> float | None:
        """The next deadline (same clock as `now`), or None."""
        earliest = self._next_sweep
        if self._sweep_left and (earliest is None or self._sweep_step_at < earliest):
            earliest = self._sweep_step_at  # the sweep under way goes on at once
        keys_expire = self.keys.next_expiry()
        if keys_expire is not None and (earliest is None or keys_expire < earliest):
            earliest = keys_expire
        sessions = self._sessions
        for session in list(self._armed):
            at = session.timer_at
            if at is None or sessions.get(session.flow) is not session:
                del self._armed[session]  # no deadline left, or no longer in the table
            elif earliest is None or at < earliest:
                earliest = at
        return earliest

    def handle_timer(self, now: float) -> None:
        """Run everything due at `now`: Init retransmissions, the session sweep, and the expiry of
        ephemeral keys made ahead and not used (KeyPool)."""
        self.keys.expire(now)
        sessions = self._sessions
        for session in list(self._armed):
            if sessions.get(session.flow) is not session:
                self._armed.pop(session, None)
                continue
            at = session.timer_at
            if at is not None and at <= now:
                session.handle_timer(now)
        if self._sweep_left:
            self._sweep(now)
        elif self._next_sweep is not None and self._next_sweep <= now:
            self._next_sweep = None
            self._sweep_left = list(reversed(self._sessions))
            self._sweep_seen = None
            self._sweep(now)

    def _schedule_sweep(self, when: float) -> None:
        if self._next_sweep is None or when < self._next_sweep:
            self._next_sweep = max(when, 0.0)

    def _sweep(self, now: float) -> None:
        """One step of a sweep: drop sessions past their linger or idle time among the next
        SWEEP_SLICE of the table (as it was when the sweep began; the next step is due at once,
        after the packets that wait). After the last step: tombstones past their time, and the
        next sweep at the earliest expiry seen (at least SWEEP_INTERVAL on)."""
        linger, idle, embryonic = self.config.session_linger, self.config.idle_timeout, self.config.embryonic_timeout
        left, sessions, seen = self._sweep_left, self._sessions, self._sweep_seen
        for _ in range(min(SWEEP_SLICE, len(left))):
            flow = left.pop()
            session = sessions.get(flow)
            if session is None:
                continue
            expires = session.last_seen + (embryonic if session.embryonic else idle)
            if session.closed_at is not None:
                expires = min(expires, session.closed_at + linger)
            if expires <= now:
                del sessions[flow]
                self._unkeyed.pop(flow, None)
                self._ended.pop(flow, None)
                self._reopened.pop(flow, None)
                self._bury(session, now)
                session.forget()
                self._events.append(SessionExpired(flow))
                continue
            if seen is None or expires < seen:
                seen = expires
            if session.send is not None:
                self._unkeyed.pop(flow, None)  # keyed since: no longer a candidate for eviction
        self._sweep_seen = seen
        self._sweep_step_at = now
        if left:
            return
        if seen is not None:
            self._schedule_sweep(max(seen, now + SWEEP_INTERVAL))
        next_tombstone = self.tombstones.expire(now)
        if next_tombstone is not None:
            self._schedule_sweep(max(next_tombstone, now + SWEEP_INTERVAL))

    def _bury(self, session: Session, now: float) -> None:
        """A session leaves the table: if it ever translated, leave a tombstone (fail closed)."""
        send = session.send
        if send is not None:
            self.tombstones.add(session.flow, to_seq(send.wire_next, send.base), now)

    def abort_all(self, reason: str, now: float) -> int:
        """Reset every live encrypted connection toward both ends (the daemon stops: its rules go,
        and such a connection must not go on in plaintext, README: Security model); return how many."""
        count = 0
        for session in self._sessions.values():
            if session.live:
                session.abort(reason, now)
                count += 1
        if count:
            self._schedule_sweep(now + self.config.session_linger)
        return count

    def cache_info(self, now: float) -> list[dict[str, object]]:
        """The resumption cache: peers and counters, never secrets (`nfq-tcpcrypt cache show`)."""
        return self.cache.info(now)

    def flush_cache(self, reason: str, peer: bytes | None = None) -> int:
        """Forget cached session secrets (all, or one peer's); return how many entries went.

        A flush of the whole cache also forgets the ephemeral keys made ahead (KeyPool): the
        triggers (README: Resumption and cloned machines) mean this may be a copy of the machine."""
        count = self.cache.flush(peer)
        if peer is None:
            self.keys.clear()
        self.counters["cache_flushes"] += 1
        logger.info("resumption cache flushed (%s): %d entries", reason, count)
        return count

    def next_event(self) -> Event | None:
        """The oldest unread event, or None."""
        return self._events.popleft() if self._events else None

    def session_table(self) -> list[dict[str, object]]:
        """One JSON-ready dict per session (README: `sessions --json`)."""
        return [session.info() for session in self._sessions.values()]


def _ack_fields(packet: bytes) -> tuple[int, bytes, int] | None:
    """(flags, ports + acknowledgment + window + options as bytes, payload length) of a packet
    the engine built itself (RFC 9293 §3.1); None when it is too short to hold them."""
    ihl = (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40
    if len(packet) < ihl + 20:
        return None
    doff = (packet[ihl + 12] >> 4) * 4
    if doff < 20 or len(packet) < ihl + doff:
        return None
    tcp = packet[ihl : ihl + doff]
    return tcp[13], tcp[:4] + tcp[8:12] + tcp[14:16] + tcp[20:], len(packet) - ihl - doff


def _is_new_syn(session: Session, seg, direction: Direction) -> bool:  # type: ignore[no-untyped-def]
    """A SYN with another ISN on a known 4-tuple starts a new connection (port reuse), except
    from the wire on a live translating session: the session answers that (RFC 5961 §4)."""
    if direction is Direction.INBOUND and session.live:
        return False
    isn = session.isn_local if direction is Direction.OUTBOUND else session.isn_remote
    return isn is not None and isn != seg.seq
