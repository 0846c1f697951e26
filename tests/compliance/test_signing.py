"""Ed25519 helpers: RFC 8032 vector, key encodings, key files; public keys checked as curve points
(small-order and non-canonical encodings refused, security review finding 7)."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedtune.compliance.signing import (
    KeyFormatError,
    check_public_key_bytes,
    decode_public_key,
    encode_public_key,
    generate_signing_key,
    key_id,
    load_private_key,
    public_key_pem,
    read_public_key,
    save_private_key,
    sign_message,
    verify_signature,
)

# RFC 8032, section 7.1, TEST 2 (one-byte message 0x72).
RFC8032_SECRET = bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
RFC8032_PUBLIC = bytes.fromhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
RFC8032_SIGNATURE = bytes.fromhex(
    "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
    "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00")


def test_rfc8032_vector():
    key = Ed25519PrivateKey.from_private_bytes(RFC8032_SECRET)
    assert sign_message(key, b"\x72") == RFC8032_SIGNATURE
    assert encode_public_key(key) == "ed25519:" + base64.b64encode(RFC8032_PUBLIC).decode()
    assert verify_signature(decode_public_key(encode_public_key(key)), b"\x72", RFC8032_SIGNATURE)
    assert not verify_signature(key.public_key(), b"\x73", RFC8032_SIGNATURE)
    assert not verify_signature(key.public_key(), b"\x72", RFC8032_SIGNATURE[:-1])


@pytest.mark.parametrize("text", ["AAAA", "ed25519:not base64!", "ed25519:" + base64.b64encode(b"x" * 31).decode()])
def test_malformed_public_keys(text):
    with pytest.raises(KeyFormatError):
        decode_public_key(text)


def test_private_key_file_round_trip_and_permissions(tmp_path):
    key = generate_signing_key()
    path = tmp_path / "agent.key"
    save_private_key(path, key)
    assert path.stat().st_mode & 0o777 == 0o600
    assert key_id(load_private_key(path)) == key_id(key) and len(key_id(key)) == 16
    with pytest.raises(FileExistsError):
        save_private_key(path, generate_signing_key())
    path.chmod(0o640)
    with pytest.raises(KeyFormatError, match="chmod 600"):
        load_private_key(path)


def test_raw_seed_key_file(tmp_path):
    path = tmp_path / "seed"
    path.write_bytes(RFC8032_SECRET)
    path.chmod(0o600)
    assert sign_message(load_private_key(path), b"\x72") == RFC8032_SIGNATURE


# --- public keys are points of the prime-order subgroup --------------------------------------------------

# The eight points of small order on edwards25519, canonically encoded: the list libsodium blocks
# (crypto_sign_ed25519 "blocklist"), written out here rather than computed by the code under test.
SMALL_ORDER = {
    "identity (order 1)": "0100000000000000000000000000000000000000000000000000000000000000",
    "y=-1 (order 2)": "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "all zero (order 4)": "0000000000000000000000000000000000000000000000000000000000000000",
    "y=0, sign (order 4)": "0000000000000000000000000000000000000000000000000000000000000080",
    "order 8 a": "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "order 8 b": "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    "order 8 c": "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "order 8 d": "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
}
# Non-canonical encodings (RFC 8032 5.1.3: y >= p, or x = 0 with the sign bit set); most name a
# small-order point again (y = p + 1 is the identity, y = p is y = 0...).
P = 2**255 - 19
NON_CANONICAL = {
    "y=p+1 (identity)": (P + 1).to_bytes(32, "little").hex(),
    "y=p (y=0)": P.to_bytes(32, "little").hex(),
    "y=p, sign": (P | 1 << 255).to_bytes(32, "little").hex(),
    "y=p+1, sign": (P + 1 | 1 << 255).to_bytes(32, "little").hex(),
    "y=2^255-1": (2**255 - 1).to_bytes(32, "little").hex(),
    "identity, sign": (1 | 1 << 255).to_bytes(32, "little").hex(),
    "y=p-1, sign": (P - 1 | 1 << 255).to_bytes(32, "little").hex(),
}
# RFC 8032 section 7.1, TEST 1 and TEST 3 public keys (TEST 2's is RFC8032_PUBLIC above).
RFC8032_KEYS = ["d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
                "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025"]
# A forged signature that needs no private key: R = the identity's encoding, S = 0.
FORGED_SIGNATURE = bytes.fromhex(SMALL_ORDER["identity (order 1)"]) + bytes(32)


def _text(raw: bytes) -> str:
    return "ed25519:" + base64.b64encode(raw).decode()


@pytest.mark.parametrize("hex_key", SMALL_ORDER.values(), ids=SMALL_ORDER.keys())
def test_small_order_keys_are_refused(hex_key):
    raw = bytes.fromhex(hex_key)
    Ed25519PublicKey.from_public_bytes(raw)  # the library takes it: the check must be ours
    with pytest.raises(KeyFormatError, match="small order"):
        decode_public_key(_text(raw))
    with pytest.raises(KeyFormatError, match="small order"):
        check_public_key_bytes(raw)


@pytest.mark.parametrize("hex_key", NON_CANONICAL.values(), ids=NON_CANONICAL.keys())
def test_non_canonical_encodings_are_refused(hex_key):
    with pytest.raises(KeyFormatError, match="not a canonical Ed25519 point encoding"):
        decode_public_key(_text(bytes.fromhex(hex_key)))


def test_an_encoding_with_no_point_is_refused():
    # y = 2: (y^2 - 1) / (d y^2 + 1) has no square root mod p, so no x exists
    with pytest.raises(KeyFormatError, match="not a canonical Ed25519 point encoding"):
        decode_public_key(_text((2).to_bytes(32, "little")))


def test_a_key_with_a_small_order_component_is_refused():
    # A + (0, -1) = (-x, -y): a real key plus the point of order 2 is a valid encoding off the
    # prime-order subgroup (y' = p - y, and the sign of x flips)
    raw = generate_signing_key().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    value = int.from_bytes(raw, "little")
    y, sign = value & ((1 << 255) - 1), value >> 255
    mixed = ((P - y) | (1 - sign) << 255).to_bytes(32, "little")
    Ed25519PublicKey.from_public_bytes(mixed)
    with pytest.raises(KeyFormatError, match="small-order component"):
        decode_public_key(_text(mixed))


def test_real_keys_still_pass():
    for hex_key in [RFC8032_PUBLIC.hex(), *RFC8032_KEYS]:
        raw = bytes.fromhex(hex_key)
        assert decode_public_key(_text(raw)).public_bytes(Encoding.Raw, PublicFormat.Raw) == raw
    for _ in range(300):
        key = generate_signing_key()
        assert verify_signature(decode_public_key(encode_public_key(key)), b"m", sign_message(key, b"m"))


def test_one_forged_signature_verifies_for_many_messages_under_a_small_order_key():
    """The finding's reproduction: nothing is signed, the signature is the identity's encoding and a
    zero scalar. The library verifies it under the all-zero key for a share of the messages (those
    whose challenge is a multiple of 4) and under the identity key for all; fedtune refuses both keys."""
    messages = [f"receipt {i}".encode() for i in range(64)]
    zero, identity = bytes(32), bytes.fromhex(SMALL_ORDER["identity (order 1)"])
    forged_zero = sum(verify_signature(Ed25519PublicKey.from_public_bytes(zero), m, FORGED_SIGNATURE)
                      for m in messages)
    forged_identity = sum(verify_signature(Ed25519PublicKey.from_public_bytes(identity), m, FORGED_SIGNATURE)
                          for m in messages)
    assert 0 < forged_zero < 64 and forged_identity == 64
    for raw in (zero, identity):
        with pytest.raises(KeyFormatError):
            decode_public_key(_text(raw))


def test_pem_and_text_key_files_are_checked_too(tmp_path):
    pem = public_key_pem(Ed25519PublicKey.from_public_bytes(bytes(32)))
    with pytest.raises(KeyFormatError, match="small order"):
        read_public_key(pem)
    with pytest.raises(KeyFormatError, match="small order"):
        read_public_key(_text(bytes(32)).encode())
    key = generate_signing_key()
    assert key_id(read_public_key(public_key_pem(key))) == key_id(key)
