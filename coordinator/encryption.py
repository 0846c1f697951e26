"""Adapter blobs at rest: AES-256-GCM under a key from the environment or a key file.

There is no default key. ``FEDTUNE_BLOB_KEY`` holds the 32-byte key in base64, or
``FEDTUNE_BLOB_KEY_FILE`` names a file (mode 0600) holding it in base64 or as 32 raw bytes;
exactly one of the two must be set.

Blob format: ``b"FTB1"`` | key id (8 bytes) | nonce (12 bytes) | ciphertext and 16-byte tag.
The header is authenticated with the caller's associated data (bind a blob to its row, e.g.
``b"fedtune.adapter:<job>:<version>"``, so blobs cannot be swapped between versions). The key id
lets a wrong key be named in the error instead of failing as a corrupt blob.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedtune.coordinator.settings import CoordinatorSettings

BLOB_KEY_ENV = CoordinatorSettings.env_name("blob_key")
BLOB_KEY_FILE_ENV = CoordinatorSettings.env_name("blob_key_file")
KEY_BYTES = 32
NONCE_BYTES = 12
MAGIC = b"FTB1"
_KEY_ID_BYTES = 8
_HEADER_BYTES = len(MAGIC) + _KEY_ID_BYTES + NONCE_BYTES
_GENERATE_HINT = 'python -c "import base64, os; print(base64.b64encode(os.urandom(32)).decode())"'


class BlobKeyError(ValueError):
    """No usable blob key: missing, ambiguous, malformed, or not the key a blob was written with."""


class BlobIntegrityError(ValueError):
    """A blob failed authentication: corrupted, truncated, or bound to other associated data."""


@dataclass(frozen=True)
class BlobKey:
    """A 32-byte AES-256-GCM key; its repr never shows the key."""

    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise BlobKeyError(f"an AES-256 key has {KEY_BYTES} bytes, this one has {len(self.key)}")

    @property
    def key_id(self) -> bytes:
        """8 bytes naming the key (a hash of it, not the key)."""
        return hashlib.sha256(b"fedtune.blob-key\x00" + self.key).digest()[:_KEY_ID_BYTES]


def generate_blob_key() -> BlobKey:
    """A fresh random key."""
    return BlobKey(secrets.token_bytes(KEY_BYTES))


def load_blob_key(environ: Mapping[str, str] | None = None) -> BlobKey:
    """The blob key from ``FEDTUNE_BLOB_KEY`` or the file named by ``FEDTUNE_BLOB_KEY_FILE``.

    Args:
        environ: the environment to read (default ``os.environ``).

    Raises:
        BlobKeyError: neither or both variables set, the file is readable by group/others, or the
            value is not 32 bytes (base64, or raw in a file).
    """
    environ = os.environ if environ is None else environ
    inline, path = environ.get(BLOB_KEY_ENV), environ.get(BLOB_KEY_FILE_ENV)
    if inline and path:
        raise BlobKeyError(f"both {BLOB_KEY_ENV} and {BLOB_KEY_FILE_ENV} are set; set exactly one")
    if inline:
        return BlobKey(_decode_key_text(inline.strip(), BLOB_KEY_ENV))
    if path:
        return BlobKey(_read_key_file(Path(path)))
    raise BlobKeyError(f"no adapter blob key: set {BLOB_KEY_ENV} (32 bytes, base64) or {BLOB_KEY_FILE_ENV} "
                       f"(a file holding it, mode 0600). Generate one with: {_GENERATE_HINT}")


def _decode_key_text(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise BlobKeyError(f"{where} is not valid base64") from e
    if len(key) != KEY_BYTES:
        raise BlobKeyError(f"{where} decodes to {len(key)} bytes; an AES-256 key has {KEY_BYTES}")
    return key


def _read_key_file(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as e:
        raise BlobKeyError(f"{BLOB_KEY_FILE_ENV}={path}: no such file") from e
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BlobKeyError(f"blob key file {path} is accessible by group or others (mode {mode & 0o777:o}); "
                           f"run: chmod 600 {path}")
    data = path.read_bytes()
    if len(data) == KEY_BYTES:
        return data
    return _decode_key_text(data.decode("ascii", errors="replace").strip(), f"key file {path}")


def encrypt_blob(plaintext: bytes, key: BlobKey, *, associated_data: bytes = b"") -> bytes:
    """``plaintext`` sealed with AES-256-GCM under a fresh random 96-bit nonce."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    header = MAGIC + key.key_id + nonce
    return header + AESGCM(key.key).encrypt(nonce, plaintext, header + associated_data)


def decrypt_blob(blob: bytes, key: BlobKey, *, associated_data: bytes = b"") -> bytes:
    """The plaintext of a blob written by :func:`encrypt_blob`.

    Raises:
        BlobKeyError: the blob was written under another key.
        BlobIntegrityError: not a fedtune blob, or it fails authentication.
    """
    if len(blob) < _HEADER_BYTES + 16 or not blob.startswith(MAGIC):
        raise BlobIntegrityError("not a fedtune encrypted blob (bad magic or too short)")
    header = blob[:_HEADER_BYTES]
    blob_key_id = header[len(MAGIC):len(MAGIC) + _KEY_ID_BYTES]
    if blob_key_id != key.key_id:
        raise BlobKeyError(f"blob was encrypted under key id {blob_key_id.hex()}, the loaded key is "
                           f"{key.key_id.hex()}")
    nonce = header[len(MAGIC) + _KEY_ID_BYTES:]
    try:
        return AESGCM(key.key).decrypt(nonce, blob[_HEADER_BYTES:], header + associated_data)
    except InvalidTag as e:
        raise BlobIntegrityError("blob failed authentication: corrupted, truncated, or bound to other "
                                 "associated data") from e


def sha256_digest(data: bytes) -> str:
    """``"sha256:<hex>"`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_encrypted_blob(path: str | Path, plaintext: bytes, key: BlobKey, *, associated_data: bytes = b"") -> str:
    """Encrypt ``plaintext`` to ``path`` durably and atomically; return the plaintext's digest.

    The blob is written to a temporary file in the same directory, fsynced, renamed over
    ``path`` and the directory fsynced: after a crash ``path`` is either absent or complete.
    Write the blob before committing the row that names it; a blob without a row is an orphan
    to collect, a row without its blob would be a broken version.

    Returns:
        ``"sha256:<hex>"`` of ``plaintext``.
    """
    path = Path(path)
    blob = encrypt_blob(plaintext, key, associated_data=associated_data)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return sha256_digest(plaintext)


def read_encrypted_blob(path: str | Path, key: BlobKey, *, associated_data: bytes = b"",
                        expected_digest: str | None = None) -> bytes:
    """Decrypt the blob at ``path``; with ``expected_digest``, also check the plaintext's SHA-256.

    Raises:
        BlobKeyError, BlobIntegrityError: as :func:`decrypt_blob`; the latter also when the
            plaintext's digest is not ``expected_digest``.
    """
    plaintext = decrypt_blob(Path(path).read_bytes(), key, associated_data=associated_data)
    if expected_digest is not None and sha256_digest(plaintext) != expected_digest:
        raise BlobIntegrityError(f"{path}: plaintext digest {sha256_digest(plaintext)} is not the recorded "
                                 f"{expected_digest}")
    return plaintext
