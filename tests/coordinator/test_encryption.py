"""Adapter blobs at rest: AES-256-GCM, key from env or key file, never a default key."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedtune.coordinator.encryption import (
    BLOB_KEY_ENV,
    BLOB_KEY_FILE_ENV,
    BlobIntegrityError,
    BlobKey,
    BlobKeyError,
    decrypt_blob,
    encrypt_blob,
    generate_blob_key,
    load_blob_key,
    read_encrypted_blob,
    write_encrypted_blob,
)

KEY = bytes(range(32))
KEY_B64 = base64.b64encode(KEY).decode()


def test_no_key_configured_is_an_error_that_says_how_to_make_one():
    with pytest.raises(BlobKeyError, match=f"{BLOB_KEY_ENV}.*{BLOB_KEY_FILE_ENV}.*Generate one with"):
        load_blob_key({})


def test_key_from_env_and_from_file(tmp_path):
    assert load_blob_key({BLOB_KEY_ENV: KEY_B64}).key == KEY
    text_file, raw_file = tmp_path / "key.b64", tmp_path / "key.raw"
    text_file.write_text(KEY_B64 + "\n")
    raw_file.write_bytes(KEY)
    for path in (text_file, raw_file):
        path.chmod(0o600)
        assert load_blob_key({BLOB_KEY_FILE_ENV: str(path)}).key == KEY


@pytest.mark.parametrize("env, match", [
    ({BLOB_KEY_ENV: KEY_B64, BLOB_KEY_FILE_ENV: "/x"}, "set exactly one"),
    ({BLOB_KEY_ENV: base64.b64encode(b"short").decode()}, "decodes to 5 bytes"),
    ({BLOB_KEY_ENV: "not base64!"}, "not valid base64"),
    ({BLOB_KEY_FILE_ENV: "/nonexistent/key"}, "no such file"),
])
def test_bad_key_configuration(env, match):
    with pytest.raises(BlobKeyError, match=match):
        load_blob_key(env)


def test_key_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "key"
    path.write_text(KEY_B64)
    path.chmod(0o644)
    with pytest.raises(BlobKeyError, match="chmod 600"):
        load_blob_key({BLOB_KEY_FILE_ENV: str(path)})


def test_key_is_not_in_repr():
    assert KEY_B64 not in repr(BlobKey(KEY)) and str(list(KEY)) not in repr(BlobKey(KEY))


def test_blob_is_aes_256_gcm_in_the_documented_layout():
    key = BlobKey(KEY)
    blob = encrypt_blob(b"adapter bytes", key, associated_data=b"job-1:3")
    header, nonce = blob[:24], blob[12:24]
    assert blob[:4] == b"FTB1" and blob[4:12] == hashlib.sha256(b"fedtune.blob-key\x00" + KEY).digest()[:8]
    # decrypt with the cryptography library directly, from the layout alone
    assert AESGCM(KEY).decrypt(nonce, blob[24:], header + b"job-1:3") == b"adapter bytes"
    assert decrypt_blob(blob, key, associated_data=b"job-1:3") == b"adapter bytes"
    assert encrypt_blob(b"adapter bytes", key)[12:24] != nonce  # fresh nonce per blob


def test_tampering_wrong_binding_and_wrong_key_are_detected():
    key = BlobKey(KEY)
    blob = encrypt_blob(b"adapter bytes", key, associated_data=b"job-1:3")
    flipped = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(BlobIntegrityError):
        decrypt_blob(flipped, key, associated_data=b"job-1:3")
    with pytest.raises(BlobIntegrityError):
        decrypt_blob(blob, key, associated_data=b"job-1:4")  # a blob moved to another version
    with pytest.raises(BlobIntegrityError, match="not a fedtune"):
        decrypt_blob(b"PK\x03\x04" + blob[4:], key)
    with pytest.raises(BlobKeyError, match="key id"):
        decrypt_blob(blob, generate_blob_key(), associated_data=b"job-1:3")


def test_write_then_read_checks_the_plaintext_digest(tmp_path):
    key = generate_blob_key()
    path = tmp_path / "v1.blob"
    digest = write_encrypted_blob(path, b"safetensors...", key, associated_data=b"v1")
    assert digest == "sha256:" + hashlib.sha256(b"safetensors...").hexdigest()
    assert b"safetensors" not in path.read_bytes()
    assert read_encrypted_blob(path, key, associated_data=b"v1", expected_digest=digest) == b"safetensors..."
    with pytest.raises(BlobIntegrityError, match="not the recorded"):
        read_encrypted_blob(path, key, associated_data=b"v1", expected_digest="sha256:00")
    assert os.listdir(tmp_path) == ["v1.blob"]  # no temporary file left behind
