"""Raw-socket injector for the segments the engine creates (docs/architecture.md).

Injected packets traverse OUTPUT/POSTROUTING again, so every socket sets an SO_MARK that the rules
skip (never queued twice). There are two marks because there are two kinds of packets:

- toward the wire (`Direction.OUTBOUND`): the *wire mark*. These are in wire space, which the local
  stack never sent, so the raw OUTPUT rule NOTRACKs them: conntrack must never see wire space.
- toward our own stack (`Direction.INBOUND`): the *local mark*. These are plaintext segments of a
  connection conntrack already follows (an ACK, a release of held data), so they are tracked like
  any packet of that connection; a host firewall with INPUT policy DROP and
  `--ctstate ESTABLISHED,RELATED -j ACCEPT` (what ufw installs) lets them in. Notracked, they would
  be UNTRACKED and that firewall would drop them.
"""

from __future__ import annotations

import logging
import socket

from ..core.flow import Direction

logger = logging.getLogger(__name__)

# <linux/in.h>, <linux/in6.h>
IP_MTU_DISCOVER = 10
IP_PMTUDISC_PROBE = 3
IPV6_MTU_DISCOVER = 23
IPV6_PMTUDISC_PROBE = 3


class Injector:
    """Sends complete IP packets (v4 or v6) through marked IPPROTO_RAW sockets, one per mark and family."""

    def __init__(self, mark: int, local_mark: int | None = None) -> None:
        self.mark = mark
        self.local_mark = mark if local_mark is None else local_mark
        self.sent = 0
        self.sent_local = 0
        self.failed = 0
        self._socks: dict[tuple[int, int], socket.socket] = {}
        self._sock(socket.AF_INET, self.mark)  # fail at start-up, not at the first packet

    def _sock(self, family: socket.AddressFamily, mark: int) -> socket.socket:
        key = (int(family), mark)
        sock = self._socks.get(key)
        if sock is None:
            # IPPROTO_RAW implies IP_HDRINCL (IPv4) and IPV6_HDRINCL (IPv6, Linux >= 4.5): raw(7), raw(7)v6.
            sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            if mark == self.mark:
                # Wire packets are sized by the engine for the real path MTU, which is 20 bytes
                # above what our stack was told (Session.icmp_in): check them against the
                # device MTU only, not the route's cached path MTU (ip(7), ipv6(7): PMTUDISC_PROBE).
                if family == socket.AF_INET:
                    sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
                else:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_PROBE)
            sock.setblocking(False)
            self._socks[key] = sock
        return sock

    def mark_for(self, direction: Direction) -> int:
        """The SO_MARK a packet going `direction` carries."""
        return self.local_mark if direction is Direction.INBOUND else self.mark

    def send(self, packet: bytes, direction: Direction = Direction.OUTBOUND) -> bool:
        """Send one IP packet to its own destination address; False (and counted) on failure."""
        mark = self.mark_for(direction)
        try:
            version = packet[0] >> 4
            if version == 4:
                dst = socket.inet_ntop(socket.AF_INET, packet[16:20])
                self._sock(socket.AF_INET, mark).sendto(packet, (dst, 0))
            elif version == 6:
                dst6 = socket.inet_ntop(socket.AF_INET6, packet[24:40])
                self._sock(socket.AF_INET6, mark).sendto(packet, (dst6, 0, 0, 0))
            else:
                raise ValueError(f"ip version {version} is neither 4 nor 6")
        except (OSError, ValueError, IndexError) as exc:
            self.failed += 1
            logger.warning("injection of a %d-byte %s packet failed: %s", len(packet), direction.value, exc)
            return False
        self.sent += 1
        if direction is Direction.INBOUND:
            self.sent_local += 1
        return True

    def close(self) -> None:
        """Close the sockets."""
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()
