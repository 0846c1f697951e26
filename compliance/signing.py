"""Ed25519 keys and signatures, shared by the client agent (signs receipts), the coordinator
(verifies them, signs audit checkpoints) and the offline verifier (verifies checkpoints).

Public keys travel and sit in SQL as text: ``"ed25519:" + base64(raw 32 bytes)``. Private keys
live in files, PEM (PKCS#8, unencrypted) by default; a file holding the raw 32-byte seed is read
too. A private key file must not be readable by group or others.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PUBLIC_KEY_PREFIX = "ed25519:"
SIGNATURE_BYTES = 64


class KeyFormatError(ValueError):
    """A key (text or file) is not an Ed25519 key in a format fedtune reads."""


def generate_signing_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 private key from the OS CSPRNG."""
    return Ed25519PrivateKey.generate()


def encode_public_key(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """``"ed25519:<base64 of the raw 32 bytes>"``; a private key is encoded by its public half."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PUBLIC_KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def decode_public_key(text: str) -> Ed25519PublicKey:
    """Read a public key written by :func:`encode_public_key`.

    Raises:
        KeyFormatError: the text is not ``ed25519:`` + base64 of exactly 32 bytes.
    """
    if not isinstance(text, str) or not text.startswith(PUBLIC_KEY_PREFIX):
        raise KeyFormatError(f"public key {text!r:.40} does not start with {PUBLIC_KEY_PREFIX!r}")
    try:
        raw = base64.b64decode(text[len(PUBLIC_KEY_PREFIX):], validate=True)
    except binascii.Error as e:
        raise KeyFormatError(f"public key {text!r:.40} is not valid base64") from e
    if len(raw) != 32:
        raise KeyFormatError(f"an Ed25519 public key has 32 bytes, this one has {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """A short stable name for a public key (first 16 hex digits of SHA-256 of its raw bytes)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def save_private_key(path: str | Path, key: Ed25519PrivateKey) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, readable by the owner only (mode 0600).

    Raises:
        FileExistsError: ``path`` exists (a key is never overwritten silently).
    """
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key file (PEM PKCS#8, or the raw 32-byte seed).

    Raises:
        KeyFormatError: the file is readable by group/others, or holds no Ed25519 private key.
    """
    path = Path(path)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFormatError(f"private key {path} is accessible by group or others (mode {mode & 0o777:o}); "
                             f"run: chmod 600 {path}")
    data = path.read_bytes()
    if len(data) == 32:
        return Ed25519PrivateKey.from_private_bytes(data)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFormatError(f"{path} is neither a PEM private key nor a raw 32-byte Ed25519 seed") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFormatError(f"{path} holds a {type(key).__name__}, fedtune needs an Ed25519 key")
    return key


def sign_message(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """The 64-byte Ed25519 signature of ``message``."""
    return key.sign(message)


def verify_signature(key: Ed25519PublicKey, message: bytes, signature: bytes) -> bool:
    """True exactly when ``signature`` is ``key``'s valid Ed25519 signature over ``message``."""
    if not isinstance(signature, bytes | bytearray) or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        key.verify(bytes(signature), message)
    except InvalidSignature:
        return False
    return True


def public_key_pem(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """The public key as PEM SubjectPublicKeyInfo (what ``openssl pkey -pubout`` writes)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def read_public_key(data: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM SubjectPublicKeyInfo or ``ed25519:<base64>`` text.

    Raises:
        KeyFormatError: neither form, or not an Ed25519 key.
    """
    text = data.strip()
    if text.startswith(PUBLIC_KEY_PREFIX.encode()):
        return decode_public_key(text.decode("ascii", errors="replace"))
    try:
        key = serialization.load_pem_public_key(text)
    except (ValueError, TypeError) as e:
        raise KeyFormatError("not a PEM public key nor 'ed25519:<base64>' text") from e
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFormatError(f"a {type(key).__name__}, fedtune needs an Ed25519 public key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read a public key file (PEM SubjectPublicKeyInfo or ``ed25519:<base64>`` text).

    Raises:
        KeyFormatError: the file holds no Ed25519 public key.
    """
    try:
        return read_public_key(Path(path).read_bytes())
    except KeyFormatError as e:
        raise KeyFormatError(f"{path}: {e}") from e
