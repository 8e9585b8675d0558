"""nfq_tcpcrypt: transparent TCP-ENO (RFC 8547) and tcpcrypt (RFC 8548) over NFQUEUE."""

__version__ = "0.1.0"
