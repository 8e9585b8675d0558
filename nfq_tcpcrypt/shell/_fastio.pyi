"""The fast queue backend's receive and verdict in C (_fastio.c; README: Queue backends)."""

def recv_packet(fd: int, /) -> tuple[int, bytes, int, int, int] | bytes | None:
    """One datagram: the usual packet's (id, payload, real length, skb_info, mark); any other
    datagram's bytes; None when the socket is empty."""

def send_verdict(
    fd: int, queue_num: int, packet_id: int, verdict: int, mark: int | None, payload: bytes | None, /
) -> None:
    """One NFQNL_MSG_VERDICT, with the mark and the new payload when given."""
