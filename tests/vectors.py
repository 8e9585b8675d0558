"""Test vectors, each block headed by its source. Code under test never computes these."""

# RFC 7748 §6.1: X25519 Diffie-Hellman (Alice = host A, Bob = host B).
X25519_A_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
X25519_A_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
X25519_B_PRIVATE = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
X25519_B_PUBLIC = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
X25519_SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")

# RFC 5869 Appendix A.1: HKDF-SHA256 basic test case.
HKDF_IKM = bytes.fromhex("0b" * 22)
HKDF_SALT = bytes.fromhex("000102030405060708090a0b0c")
HKDF_INFO = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
HKDF_PRK = bytes.fromhex("077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5")
HKDF_OKM = bytes.fromhex(
    "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
)

# Self-consistency vectors of RFC 8548 (computed by us from the RFC formulas,
# not published in the RFC). Inputs: the RFC 7748 keys above, N_A = 00..1f, N_B = 20..3f, A's SYN
# ENO 45 03 23, B's SYN-ACK ENO 45 04 01 23, AEAD 0x0001.
N_A = bytes(range(32))
N_B = bytes(range(32, 64))
ENO_TRANSCRIPT = bytes.fromhex("45032345040123")
INIT1_LEN = 75
INIT2_LEN = 74
SS0 = bytes.fromhex("57b451fb5d9a89f812be6014167252a32a16a9b5759ae39754c372c48c7940fb")
MK0 = bytes.fromhex("3f67b8c27ad91954c6d1e3d52f3b9613f6c97f98b3f523ba37580c4f6145aa12")
K_AB0 = bytes.fromhex("2f92ea21324d987d1fd4d63ac755d03d7ac13d921cab49db0b4d0830")
K_BA0 = bytes.fromhex("6572aa65310eaaaa07f8d65dc132875057d8dd408b3e77d989ca2cd7")
SESSION_ID0 = bytes.fromhex("2360583ca04231aa3be00fb3d3e878f7f5a8e610875816bebcb7cecca7780e386f")
MK1 = bytes.fromhex("f94c952748af78c3d8ed778ff7c033f6a844b4a4fbbfc01deebc0698abfd7a7a")
K_AB1 = bytes.fromhex("1e83b95785c9ef5956a6bbfcc976f8fd9356c57b381bfa93745160cc")
FIRST_FRAME_OFFSET = 75
FIRST_FRAME_PLAINTEXT = b"\x00hello"
FIRST_FRAME = bytes.fromhex("0000166794b1565fafcfab8afcab3f0c0960a9627c71abeeaa")
SS1 = bytes.fromhex("1665859b0d79b86d0ee80780a5986c6d7524fd1f5509adbd9d06d684de6dc130")
RESUME1 = bytes.fromhex("6c85ba61caecae74aa6a92af908d78d80bac")
NONCE_A = bytes.fromhex("a0a1a2a3a4a5a6a7")
NONCE_B = bytes.fromhex("b0b1b2b3b4b5b6b7")
RESUMED_SUBOPT_A = bytes.fromhex("a36c85ba61caecae74aaa0a1a2a3a4a5a6a7")
RESUMED_SUBOPT_B = bytes.fromhex("a36a92af908d78d80bacb0b1b2b3b4b5b6b7")
RESUMED_MK0 = bytes.fromhex("8dbec8b3d3ad71a7ae0efe6e0ea1b41f03ea4ee0d880d7ae9957a8ad7e6dc4d7")
RESUMED_K_AB0 = bytes.fromhex("730b1f7c39f2796da85039d0b132ae1a06752f8f37777e4c7cbe9b58")
RESUMED_K_BA0 = bytes.fromhex("0ef8fac7644befc90d8511d2d0f5d16f7abf75a8219a1272404db1e4")
RESUMED_SESSION_ID = bytes.fromhex("a31f02a1dc80ff5b7c9961e672ff9b7b8fe4d208ae00ada876df6216fa879f0f11")
SS2 = bytes.fromhex("213ea3b50172fba7f34b69e24eda7be2388921b63f23c8a32521218e87483161")

# RFC 8547 §6 and §4.8 with concrete bytes.
ENO_A_SYN = bytes.fromhex("45042423")  # A offers X448 (0x24) and X25519 (0x23)
ENO_B_SYNACK = bytes.fromhex("45040123")  # B: global b=1, TEP 0x23
ENO_EXAMPLE_TRANSCRIPT = bytes.fromhex("4504242345040123")
ENO_NON_SYN = bytes.fromhex("4502")
