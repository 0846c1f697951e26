"""Ed25519 keys and signatures, shared by the client agent (signs receipts), the coordinator
(verifies them, signs audit checkpoints) and the offline verifier (verifies checkpoints).

Public keys travel and sit in SQL as text: ``"ed25519:" + base64(raw 32 bytes)``. Private keys
live in files, PEM (PKCS#8, unencrypted) by default; a file holding the raw 32-byte seed is read
too. A private key file must not be readable by group or others.

A public key is checked as a curve point, not as a string (:func:`check_public_key_bytes`): its
32 bytes must decode per RFC 8032 section 5.1.3 (canonical y, recoverable x) to a point of the
prime-order subgroup. The library verifies signatures under any 32 bytes that decode, and under a
small-order key one fixed forged signature verifies for a share of all messages (all of them
under the identity ``0100..00``), so such keys are refused wherever a key is read.
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


# Edwards25519 (RFC 8032, section 5.1): field prime, curve constant, order of the base point's group.
_P = 2**255 - 19
_D = -121665 * pow(121666, -1, _P) % _P
_L = 2**252 + 27742317777372353535851937790883648493
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_IDENTITY = (0, 1, 1, 0)  # extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z, x*y = T/Z


def _decode_point(raw: bytes) -> tuple[int, int, int, int] | None:
    """RFC 8032 section 5.1.3: the point a 32-byte encoding names, or None if it names none
    (y >= p: not canonical; no x for this y; x = 0 with the sign bit set: not canonical)."""
    y = int.from_bytes(raw, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    if y >= _P:
        return None
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P  # candidate sqrt(u / v)
    if v * x * x % _P == (-u) % _P:
        x = x * _SQRT_M1 % _P
    elif v * x * x % _P != u:
        return None
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = _P - x
    return x, y, 1, x * y % _P


def _add(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Point addition (RFC 8032 section 5.1.4; complete: it doubles too)."""
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    aa, bb = (y1 - x1) * (y2 - x2) % _P, (y1 + x1) * (y2 + x2) % _P
    cc, dd = 2 * _D * t1 * t2 % _P, 2 * z1 * z2 % _P
    e, f, g, h = bb - aa, dd - cc, dd + cc, bb + aa
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _multiply(n: int, point: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    result = _IDENTITY
    while n:
        if n & 1:
            result = _add(result, point)
        point, n = _add(point, point), n >> 1
    return result


def _is_identity(point: tuple[int, int, int, int]) -> bool:
    x, y, z, _ = point
    return x % _P == 0 and (y - z) % _P == 0


def check_public_key_bytes(raw: bytes) -> None:
    """Refuse 32 bytes that are not a usable Ed25519 public key.

    The encoding must decode as RFC 8032 section 5.1.3 says (canonical: y < p, and not x = 0 with
    the sign bit set; some x exists for y), and the point must generate the prime-order subgroup:
    l * A is the identity (no torsion component) and 8 * A is not (not one of the 8 points of small
    order, e.g. the identity ``0100..00`` or the all-zero encoding, under which a fixed forged
    signature verifies for many messages). Every key ``Ed25519PrivateKey.generate()`` makes passes.

    Raises:
        KeyFormatError: not 32 bytes, not a canonical point encoding, or not of prime order l.
    """
    if len(raw) != 32:
        raise KeyFormatError(f"an Ed25519 public key has 32 bytes, this one has {len(raw)}")
    point = _decode_point(raw)
    if point is None:
        raise KeyFormatError(f"public key {raw.hex()} is not a canonical Ed25519 point encoding (RFC 8032 5.1.3)")
    if _is_identity(_multiply(8, point)):
        raise KeyFormatError(f"public key {raw.hex()} is a point of small order: signatures under it prove "
                             f"nothing (one forged signature verifies for many messages); generate a real key")
    if not _is_identity(_multiply(_L, point)):
        raise KeyFormatError(f"public key {raw.hex()} has a small-order component (not in the prime-order "
                             f"subgroup); generate a real key")


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
        KeyFormatError: the text is not ``ed25519:`` + base64 of exactly 32 bytes, or those bytes are
            not a point of the prime-order subgroup (:func:`check_public_key_bytes`).
    """
    if not isinstance(text, str) or not text.startswith(PUBLIC_KEY_PREFIX):
        raise KeyFormatError(f"public key {text!r:.40} does not start with {PUBLIC_KEY_PREFIX!r}")
    try:
        raw = base64.b64decode(text[len(PUBLIC_KEY_PREFIX):], validate=True)
    except binascii.Error as e:
        raise KeyFormatError(f"public key {text!r:.40} is not valid base64") from e
    check_public_key_bytes(raw)
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
        KeyFormatError: neither form, not an Ed25519 key, or not a point of the prime-order subgroup.
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
    check_public_key_bytes(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
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
