"""Raw-socket injector for the segments the engine creates (DESIGN.md §2, §5).

Injected packets traverse OUTPUT/POSTROUTING again, so the sockets set SO_MARK to the daemon's mark:
the rules never queue a marked packet and NOTRACK it in raw OUTPUT.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

logger = logging.getLogger(__name__)


class Injector:
    """Sends complete IP packets (v4 or v6) through marked IPPROTO_RAW sockets."""

    def __init__(self, mark: int) -> None:
        self.mark = mark
        self.sent = 0
        self.failed = 0
        self._v4 = self._open(socket.AF_INET)
        self._v6: socket.socket | None = None

    def _open(self, family: socket.AddressFamily) -> socket.socket:
        # IPPROTO_RAW implies IP_HDRINCL (IPv4) and IPV6_HDRINCL (IPv6, Linux >= 4.5): raw(7), raw(7)v6.
        sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
        sock.setblocking(False)
        return sock

    def send(self, packet: bytes) -> bool:
        """Send one IP packet to its own destination address; False (and counted) on failure."""
        try:
            version = packet[0] >> 4
            if version == 4:
                dst = str(ipaddress.IPv4Address(packet[16:20]))
                self._v4.sendto(packet, (dst, 0))
            elif version == 6:
                if self._v6 is None:
                    self._v6 = self._open(socket.AF_INET6)
                dst = str(ipaddress.IPv6Address(packet[24:40]))
                self._v6.sendto(packet, (dst, 0, 0, 0))
            else:
                raise ValueError(f"ip version {version} is neither 4 nor 6")
        except (OSError, ValueError, IndexError) as exc:
            self.failed += 1
            logger.warning("injection of a %d-byte packet failed: %s", len(packet), exc)
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        """Close the sockets."""
        self._v4.close()
        if self._v6 is not None:
            self._v6.close()
