"""The nfnetlink_queue wire format: config, verdict and packet messages (no socket here).

Messages are a netlink header, an nfgenmsg (family, version, queue number big-endian) and
attributes (length, type, value padded to 4 bytes). Values inside the queue's attributes are
big-endian; netlink's own headers are in host order. Names and numbers are those of the kernel's
uapi headers linux/netfilter/nfnetlink_queue.h and linux/netlink.h.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from typing import Final

NETLINK_NETFILTER: Final = 12
SOL_NETLINK: Final = 270
NFNL_SUBSYS_QUEUE: Final = 3

NFQNL_MSG_PACKET: Final = 0
NFQNL_MSG_VERDICT: Final = 1
NFQNL_MSG_CONFIG: Final = 2
NFQNL_MSG_VERDICT_BATCH: Final = 3

NLM_F_REQUEST: Final = 0x1
NLM_F_ACK: Final = 0x4
NLMSG_NOOP: Final = 1
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLA_TYPE_MASK: Final = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

# config attributes and commands
NFQA_CFG_CMD: Final = 1
NFQA_CFG_PARAMS: Final = 2
NFQA_CFG_QUEUE_MAXLEN: Final = 3
NFQA_CFG_MASK: Final = 4
NFQA_CFG_FLAGS: Final = 5
NFQNL_CFG_CMD_BIND: Final = 1
NFQNL_CFG_CMD_UNBIND: Final = 2
NFQNL_COPY_PACKET: Final = 2
NFQA_CFG_F_FAIL_OPEN: Final = 0x1
NFQA_CFG_F_CONNTRACK: Final = 0x2
NFQA_CFG_F_GSO: Final = 0x4

# packet and verdict attributes
NFQA_PACKET_HDR: Final = 1
NFQA_VERDICT_HDR: Final = 2
NFQA_MARK: Final = 3
NFQA_IFINDEX_INDEV: Final = 5
NFQA_IFINDEX_OUTDEV: Final = 6
NFQA_PAYLOAD: Final = 10
NFQA_CAP_LEN: Final = 13
NFQA_SKB_INFO: Final = 14

NFQA_SKB_CSUMNOTREADY: Final = 0x1
"""The transport checksum is not filled in yet (CHECKSUM_PARTIAL; only with NFQA_CFG_F_GSO)."""
NFQA_SKB_GSO: Final = 0x2
"""A GSO/GRO super-packet the kernel segments after the verdict (only with NFQA_CFG_F_GSO)."""
NFQA_SKB_CSUM_NOTVERIFIED: Final = 0x4
"""On an inbound hook: the kernel has not verified the checksum (neither flag: it has)."""

NF_DROP: Final = 0
NF_ACCEPT: Final = 1

MAX_PAYLOAD: Final = 0xFFFF - 4
"""The most packet bytes one attribute can hold (its length field is 16 bits, header included): the
kernel's copy range is capped there (NFQNL_MAX_COPY_RANGE), and a verdict's new packet must fit too."""
COPY_RANGE: Final = MAX_PAYLOAD
"""Bytes of each packet copied to us: all of it, up to 65,531 (a longer one arrives cut, with its
real length in NFQA_CAP_LEN, and is accepted unchanged)."""

_NLMSGHDR: Final = struct.Struct("=IHHII")
_NFGENMSG: Final = struct.Struct("!BBH")
_NLATTR: Final = struct.Struct("=HH")
_BE32: Final = struct.Struct("!I")
_BE16: Final = struct.Struct("!H")
_U8: Final = struct.Struct("B")
_PACKET_HDR: Final = struct.Struct("!IHB")
_VERDICT_HDR: Final = struct.Struct("!II")
_ERRNO: Final = struct.Struct("=i")
HEADER_LEN: Final = _NLMSGHDR.size + _NFGENMSG.size
_PADS: Final = (b"", b"\0\0\0", b"\0\0", b"\0")


def pad(length: int) -> bytes:
    """The zero bytes that round `length` up to netlink's 4-byte alignment."""
    return _PADS[length & 3]


def attr(kind: int, value: bytes) -> bytes:
    """One attribute, padded."""
    length = _NLATTR.size + len(value)
    return _NLATTR.pack(length, kind) + value + pad(length)


def message(msg: int, queue_num: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    """A whole nfnetlink_queue message of type `msg` for `queue_num`."""
    length = HEADER_LEN + len(attrs)
    return (
        _NLMSGHDR.pack(length, (NFNL_SUBSYS_QUEUE << 8) | msg, flags, seq, 0)
        + _NFGENMSG.pack(0, 0, queue_num)
        + attrs
    )


def config_command(queue_num: int, command: int, seq: int = 0) -> bytes:
    """Bind or unbind `queue_num` (acknowledged: the kernel answers with an NLMSG_ERROR)."""
    value = struct.pack("!BxH", command, 0)
    return message(NFQNL_MSG_CONFIG, queue_num, attr(NFQA_CFG_CMD, value), NLM_F_REQUEST | NLM_F_ACK, seq)


def config_queue(queue_num: int, max_len: int, flags: int, mask: int, seq: int = 0) -> bytes:
    """Copy whole packets (COPY_RANGE), at most `max_len` waiting, and the queue flags under `mask`."""
    attrs = (
        attr(NFQA_CFG_PARAMS, _BE32.pack(COPY_RANGE) + _U8.pack(NFQNL_COPY_PACKET))
        + attr(NFQA_CFG_QUEUE_MAXLEN, _BE32.pack(max_len))
        + attr(NFQA_CFG_FLAGS, _BE32.pack(flags))
        + attr(NFQA_CFG_MASK, _BE32.pack(mask))
    )
    return message(NFQNL_MSG_CONFIG, queue_num, attrs, NLM_F_REQUEST | NLM_F_ACK, seq)


_VERDICT_ATTR_LEN: Final = _NLATTR.size + _VERDICT_HDR.size
_VERDICT_ATTR: Final = _NLATTR.pack(_VERDICT_ATTR_LEN, NFQA_VERDICT_HDR)
_MARK_ATTR: Final = _NLATTR.pack(_NLATTR.size + _BE32.size, NFQA_MARK)
_PREFIXES: Final[dict[tuple[int, int, bool], bytes]] = {}


def _fixed_prefix(msg: int, queue_num: int, with_mark: bool) -> bytes:
    """The constant start of a verdict message without payload (its headers and the verdict
    attribute's header), made once per queue, message type and mark or not: at most a few."""
    key = (msg, queue_num, with_mark)
    prefix = _PREFIXES.get(key)
    if prefix is None:
        length = HEADER_LEN + _VERDICT_ATTR_LEN + (_NLATTR.size + _BE32.size if with_mark else 0)
        prefix = _PREFIXES[key] = (
            _NLMSGHDR.pack(length, (NFNL_SUBSYS_QUEUE << 8) | msg, NLM_F_REQUEST, 0, 0)
            + _NFGENMSG.pack(0, 0, queue_num) + _VERDICT_ATTR
        )  # fmt: skip
    return prefix


def verdict_head(queue_num: int, packet_id: int, action: int, mark: int | None, payload_len: int | None) -> bytes:
    """A verdict message up to (and with) the payload attribute's header; the payload and `pad`
    follow, so a mangled packet goes out without being copied into the message."""
    if payload_len is None:
        if mark is None:
            return _fixed_prefix(NFQNL_MSG_VERDICT, queue_num, False) + _VERDICT_HDR.pack(action, packet_id)
        return (_fixed_prefix(NFQNL_MSG_VERDICT, queue_num, True) + _VERDICT_HDR.pack(action, packet_id)
                + _MARK_ATTR + _BE32.pack(mark))  # fmt: skip
    attr_len = _NLATTR.size + payload_len
    padded = (attr_len + 3) & ~3
    if mark is None:
        return (_U32.pack(_PAYLOAD_HEAD_LEN + padded) + _payload_prefix(queue_num)
                + _VERDICT_HDR.pack(action, packet_id) + _NLATTR.pack(attr_len, NFQA_PAYLOAD))  # fmt: skip
    return (_U32.pack(_PAYLOAD_HEAD_LEN + _MARK_ATTR_LEN + padded) + _payload_prefix(queue_num)
            + _VERDICT_MARK.pack(action, packet_id, _MARK_ATTR, mark)
            + _NLATTR.pack(attr_len, NFQA_PAYLOAD))  # fmt: skip


_U32: Final = struct.Struct("=I")
_MARK_ATTR_LEN: Final = _NLATTR.size + _BE32.size
_PAYLOAD_HEAD_LEN: Final = HEADER_LEN + _VERDICT_ATTR_LEN
_VERDICT_MARK: Final = struct.Struct("!II4sI")
"""The verdict header, then the mark attribute (its header `_MARK_ATTR`, host order, as bytes)."""
_PAYLOAD_PREFIXES: Final[dict[int, bytes]] = {}


def _payload_prefix(queue_num: int) -> bytes:
    """What follows the length in every verdict with new bytes for `queue_num`: the rest of the
    netlink header, the nfgenmsg and the verdict attribute's header (made once per queue)."""
    prefix = _PAYLOAD_PREFIXES.get(queue_num)
    if prefix is None:
        prefix = _PAYLOAD_PREFIXES[queue_num] = (
            _NLMSGHDR.pack(0, (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT, NLM_F_REQUEST, 0, 0)[4:]
            + _NFGENMSG.pack(0, 0, queue_num) + _VERDICT_ATTR
        )  # fmt: skip
    return prefix


def verdict(
    queue_num: int, packet_id: int, action: int, mark: int | None = None, payload: bytes | None = None
) -> bytes:
    """One packet's verdict, optionally with a new mark and replacement bytes."""
    if payload is None:
        return verdict_head(queue_num, packet_id, action, mark, None)
    return verdict_head(queue_num, packet_id, action, mark, len(payload)) + payload + pad(4 + len(payload))


def verdict_batch(queue_num: int, packet_id: int, action: int) -> bytes:
    """The same verdict for every packet of the queue with an id up to `packet_id`."""
    return _fixed_prefix(NFQNL_MSG_VERDICT_BATCH, queue_num, False) + _VERDICT_HDR.pack(action, packet_id)


@dataclass(slots=True)
class QueuedPacket:
    """What the kernel told us about one queued packet."""

    queue_num: int
    packet_id: int
    hw_protocol: int
    hook: int
    payload: bytes
    cap_len: int
    """The packet's real length (larger than len(payload) when the copy was cut)."""
    skb_info: int = 0
    """NFQA_SKB_* flags: GSO super-packet, checksum not ready."""
    mark: int = 0
    indev: int = 0
    outdev: int = 0

    @property
    def gso(self) -> bool:
        """A super-packet the kernel segments after the verdict."""
        return bool(self.skb_info & NFQA_SKB_GSO)

    @property
    def csum_not_ready(self) -> bool:
        """Its transport checksum is left for the kernel (or us, after a rewrite) to fill in."""
        return bool(self.skb_info & NFQA_SKB_CSUMNOTREADY)


def refused(errno: int, seq: int) -> OSError:
    """The error for a request the kernel refused (an NLMSG_ERROR with a negative errno): a plain
    OSError, since compiled modules cannot subclass it."""
    return OSError(errno, f"netlink request {seq} failed: errno {errno}")


@dataclass(slots=True)
class Ack:
    """An NLMSG_ERROR: `errno` 0 is an acknowledgement."""

    errno: int
    seq: int


def parse(data: bytes | bytearray | memoryview, end: int | None = None) -> list[QueuedPacket | Ack]:
    """The packets and acknowledgements/errors in the first `end` bytes of a datagram; a malformed
    message ends it (what came before it stands)."""
    out: list[QueuedPacket | Ack] = []
    offset = 0
    end = len(data) if end is None else end
    data = memoryview(data)  # a packet's bytes are copied once, from the receive buffer
    while offset + 16 <= end:
        length, msg_type, _flags, seq, _pid = _NLMSGHDR_UNPACK(data, offset)
        if length < 16 or offset + length > end:
            break
        if msg_type == _PACKET_TYPE:
            if length >= HEADER_LEN:
                packet = _packet(data, offset, offset + length)
                if packet is not None:
                    out.append(packet)
        elif msg_type == NLMSG_ERROR and length >= 20:
            out.append(Ack(-_ERRNO_UNPACK(data, offset + 16)[0], seq))
        offset += (length + 3) & ~3
    return out


_NLMSGHDR_UNPACK: Final = _NLMSGHDR.unpack_from
_NLATTR_UNPACK: Final = _NLATTR.unpack_from
_BE32_UNPACK: Final = _BE32.unpack_from
_BE16_UNPACK: Final = _BE16.unpack_from
_ERRNO_UNPACK: Final = _ERRNO.unpack_from
_PACKET_HDR_UNPACK: Final = _PACKET_HDR.unpack_from
_PACKET_TYPE: Final = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
_PACKET_HDR_SIZE: Final = _PACKET_HDR.size
_NUMBERS: Final = frozenset((NFQA_CAP_LEN, NFQA_SKB_INFO, NFQA_MARK, NFQA_IFINDEX_INDEV, NFQA_IFINDEX_OUTDEV))


def _packet(data: bytes | bytearray | memoryview, start: int, end: int) -> QueuedPacket | None:
    """One NFQNL_MSG_PACKET; None without a packet header or payload, or with a bad attribute."""
    queue_num = _BE16_UNPACK(data, start + 18)[0]
    header: tuple[int, int, int] | None = None
    payload: bytes | None = None
    numbers = {NFQA_CAP_LEN: 0, NFQA_SKB_INFO: 0, NFQA_MARK: 0, NFQA_IFINDEX_INDEV: 0, NFQA_IFINDEX_OUTDEV: 0}
    offset = start + HEADER_LEN
    while offset + 4 <= end:
        length, kind = _NLATTR_UNPACK(data, offset)
        if length < 4 or offset + length > end:
            return None
        kind &= NLA_TYPE_MASK
        if kind == NFQA_PAYLOAD:
            payload = bytes(data[offset + 4 : offset + length])
        elif kind == NFQA_PACKET_HDR:
            if length >= 4 + _PACKET_HDR.size:
                header = _PACKET_HDR_UNPACK(data, offset + 4)
        elif kind in _NUMBERS and length >= 8:
            numbers[kind] = _BE32_UNPACK(data, offset + 4)[0]
        offset += (length + 3) & ~3
    if header is None or payload is None:
        return None
    return QueuedPacket(
        queue_num, header[0], header[1], header[2], payload, numbers[NFQA_CAP_LEN] or len(payload),
        numbers[NFQA_SKB_INFO], numbers[NFQA_MARK], numbers[NFQA_IFINDEX_INDEV], numbers[NFQA_IFINDEX_OUTDEV],
    )  # fmt: skip


_NATIVE_LITTLE: Final = sys.byteorder == "little"


def _ne16(data: bytearray, offset: int) -> int:
    """A host-order 16-bit field (netlink's own headers), read byte by byte (native when compiled)."""
    if _NATIVE_LITTLE:
        return data[offset] | data[offset + 1] << 8
    return data[offset] << 8 | data[offset + 1]


def _ne32(data: bytearray, offset: int) -> int:
    """A host-order 32-bit field."""
    if _NATIVE_LITTLE:
        return data[offset] | data[offset + 1] << 8 | data[offset + 2] << 16 | data[offset + 3] << 24
    return data[offset] << 24 | data[offset + 1] << 16 | data[offset + 2] << 8 | data[offset + 3]


def _be32(data: bytearray, offset: int) -> int:
    """A big-endian 32-bit value (the queue's attributes)."""
    return data[offset] << 24 | data[offset + 1] << 16 | data[offset + 2] << 8 | data[offset + 3]


def single_packet(data: bytearray, size: int) -> tuple[int, int, int, int, int, int] | None:
    """(packet id, payload start, payload end, real length, NFQA_SKB_* flags, mark) when the first
    `size` bytes of `data` are one well-formed packet message, the way the kernel sends each queued
    packet (its packet header first, the payload last); None for anything else, which `parse` reads.

    The queue's per-packet path: no list, no dict, no dataclass, no copy (the caller copies
    data[start:end]), the attributes the daemon does not use (devices, hardware address, timestamp)
    skipped, and the fields read byte by byte, which mypyc compiles to plain loads."""
    if size < HEADER_LEN + 12 or len(data) < size:
        return None
    length = _ne32(data, 0)
    if _ne16(data, 4) != _PACKET_TYPE or length > size or length + 3 < size:
        return None
    attr_len = _ne16(data, HEADER_LEN)
    if _ne16(data, HEADER_LEN + 2) & NLA_TYPE_MASK != NFQA_PACKET_HDR or attr_len < 4 + _PACKET_HDR_SIZE:
        return None
    packet_id = _be32(data, HEADER_LEN + 4)
    cap_len = skb_info = mark = 0
    offset = HEADER_LEN + ((attr_len + 3) & ~3)
    while offset + 4 <= length:
        attr_len = _ne16(data, offset)
        if attr_len < 4 or offset + attr_len > length:
            return None
        kind = _ne16(data, offset + 2) & NLA_TYPE_MASK
        if kind == NFQA_PAYLOAD:
            if offset + attr_len + 3 < length:  # not the last attribute: parse() decides
                return None
            return packet_id, offset + 4, offset + attr_len, cap_len or attr_len - 4, skb_info, mark
        if kind == NFQA_PACKET_HDR:  # a second header: parse() decides
            return None
        if attr_len >= 8:
            if kind == NFQA_SKB_INFO:
                skb_info = _be32(data, offset + 4)
            elif kind == NFQA_MARK:
                mark = _be32(data, offset + 4)
            elif kind == NFQA_CAP_LEN:
                cap_len = _be32(data, offset + 4)
        offset += (attr_len + 3) & ~3
    return None
