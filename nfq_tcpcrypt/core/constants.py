"""Registries and limits of RFC 8547 (TCP-ENO) and RFC 8548 (tcpcrypt)."""

from __future__ import annotations

from enum import IntEnum, StrEnum

# RFC 8547 §4.1, §11: TCP option kind of TCP-ENO.
ENO_OPTION_KIND = 69

# RFC 8547 §4.2: bits of the global suboption.
ENO_GLOBAL_B = 0x01  # passive role
ENO_GLOBAL_A = 0x02  # application-aware


class Role(StrEnum):
    """RFC 8547 §4.3: host A (the active opener, or the SYN without the b bit) and host B."""

    A = "A"
    B = "B"


# RFC 8547 §4.1 Table 1: first-byte ranges of a suboption.
ENO_V_BIT = 0x80
ENO_TEP_MIN = 0x20


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


TEP_NAMES = {Tep.X25519: "x25519", Tep.X448: "x448", Tep.P256: "p256", Tep.P521: "p521"}
AEAD_NAMES = {
    Aead.AES_128_GCM: "aes128gcm",
    Aead.AES_256_GCM: "aes256gcm",
    Aead.CHACHA20_POLY1305: "chacha20poly1305",
}

# RFC 8548 §4.3 Table 1: one-octet CPRF constants and message magics.
CONST_NEXTK = 0x01
CONST_SESSID = 0x02
CONST_REKEY = 0x03
CONST_KEY_A = 0x04
CONST_KEY_B = 0x05
CONST_RESUME = 0x06
INIT1_MAGIC = 0x15101A0E
INIT2_MAGIC = 0x097105E0

# RFC 8548 §3.1, §5: lengths shared by all four TEPs.
N_A_LEN = 32
N_B_LEN = 32
K_LEN = 32

# RFC 8548 §4.2: frame = control (1) + clen (2) + ciphertext; plaintext = flags (1) + data.
FRAME_HEADER_LEN = 3
TAG_LEN = 16
FRAME_OVERHEAD = FRAME_HEADER_LEN + 1 + TAG_LEN  # 20 bytes on the wire per frame
MAX_CLEN = 0xFFFF
MAX_FRAME_DATA = MAX_CLEN - TAG_LEN - 1
CONTROL_REKEY = 0x01
FLAG_FINP = 0x01
FLAG_URGP = 0x02

# Longest Init1/Init2 we accept: 8 header bytes, 255 ciphers, nonce, the largest public key (P-521
# with prefix, 69 bytes) and generous room for the `ignored` trailer of RFC 8548 §4.1.
MAX_INIT_LEN = 4096

# RFC 793 / RFC 9293 §3.1: TCP flag bits.
TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80

# TCP option kinds (RFC 9293 §3.2, RFC 7323, RFC 2018, RFC 7413).
TCPOPT_EOL = 0
TCPOPT_NOP = 1
TCPOPT_MSS = 2
TCPOPT_WSCALE = 3
TCPOPT_SACK_PERM = 4
TCPOPT_SACK = 5
TCPOPT_TIMESTAMP = 8
TCPOPT_FASTOPEN = 34
TCP_MAX_OPTIONS = 40
