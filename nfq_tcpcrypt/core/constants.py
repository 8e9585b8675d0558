"""Registries and limits of RFC 8547 (TCP-ENO) and RFC 8548 (tcpcrypt)."""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Final

# RFC 8547 §4.1, §11: TCP option kind of TCP-ENO.
ENO_OPTION_KIND: Final = 69

# RFC 8547 §4.2: bits of the global suboption.
ENO_GLOBAL_B: Final = 0x01  # passive role
ENO_GLOBAL_A: Final = 0x02  # application-aware


class Role(StrEnum):
    """RFC 8547 §4.3: host A (the active opener, or the SYN without the b bit) and host B."""

    A = "A"
    B = "B"


# RFC 8547 §4.1 Table 1: first-byte ranges of a suboption.
ENO_V_BIT: Final = 0x80
ENO_TEP_MIN: Final = 0x20


class Tep(IntEnum):
    """RFC 8548 §7 (RFC 8547 §11): TCP encryption protocol identifiers of tcpcrypt."""

    P256 = 0x21
    P521 = 0x22
    X25519 = 0x23
    X448 = 0x24


class Aead(IntEnum):
    """RFC 8548 §6, §7: tcpcrypt AEAD algorithm identifiers (two bytes on the wire)."""

    AES_128_GCM = 0x0001
    AES_256_GCM = 0x0002
    CHACHA20_POLY1305 = 0x0010


TEP_NAMES: Final = {Tep.X25519: "x25519", Tep.X448: "x448", Tep.P256: "p256", Tep.P521: "p521"}
TEPS: Final[dict[int, Tep]] = {int(tep): tep for tep in Tep}  # a dict lookup, cheaper than calling the Enum
AEAD_NAMES: Final = {
    Aead.AES_128_GCM: "aes128gcm",
    Aead.AES_256_GCM: "aes256gcm",
    Aead.CHACHA20_POLY1305: "chacha20poly1305",
}

# RFC 8548 §4.3 Table 1: one-octet CPRF constants and message magics.
CONST_NEXTK: Final = 0x01
CONST_SESSID: Final = 0x02
CONST_REKEY: Final = 0x03
CONST_KEY_A: Final = 0x04
CONST_KEY_B: Final = 0x05
CONST_RESUME: Final = 0x06
INIT1_MAGIC: Final = 0x15101A0E
INIT2_MAGIC: Final = 0x097105E0

# RFC 8548 §3.1, §5: lengths shared by all four TEPs.
N_A_LEN: Final = 32
N_B_LEN: Final = 32
K_LEN: Final = 32

# RFC 8548 §4.2: frame = control (1) + clen (2) + ciphertext; plaintext = flags (1) + data.
FRAME_HEADER_LEN: Final = 3
TAG_LEN: Final = 16
FRAME_OVERHEAD: Final = FRAME_HEADER_LEN + 1 + TAG_LEN  # 20 bytes on the wire per frame
MAX_CLEN: Final = 0xFFFF
MAX_FRAME_DATA: Final = MAX_CLEN - TAG_LEN - 1
CONTROL_REKEY: Final = 0x01
FLAG_FINP: Final = 0x01
FLAG_URGP: Final = 0x02

# Longest Init1/Init2 we accept: 8 header bytes, 255 ciphers, nonce, the largest public key (P-521
# with prefix, 69 bytes) and generous room for the `ignored` trailer of RFC 8548 §4.1.
MAX_INIT_LEN: Final = 4096

# RFC 793 / RFC 9293 §3.1: TCP flag bits.
TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
TCP_PSH: Final = 0x08
TCP_ACK: Final = 0x10
TCP_URG: Final = 0x20
TCP_ECE: Final = 0x40
TCP_CWR: Final = 0x80

# TCP option kinds (RFC 9293 §3.2, RFC 7323, RFC 2018, RFC 7413).
TCPOPT_EOL: Final = 0
TCPOPT_NOP: Final = 1
TCPOPT_MSS: Final = 2
TCPOPT_WSCALE: Final = 3
TCPOPT_SACK_PERM: Final = 4
TCPOPT_SACK: Final = 5
TCPOPT_TIMESTAMP: Final = 8
TCPOPT_FASTOPEN: Final = 34
TCP_MAX_OPTIONS: Final = 40
