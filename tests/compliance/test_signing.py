"""Ed25519 helpers: RFC 8032 vector, key encodings, key files."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtune.compliance.signing import (
    KeyFormatError,
    decode_public_key,
    encode_public_key,
    generate_signing_key,
    key_id,
    load_private_key,
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
