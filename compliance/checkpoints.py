"""Signed checkpoints of the audit log, and the coordinator's checkpoint key.

A checkpoint says "the audit log had ``tree_size`` records and this RFC 6962 Merkle root at
``signed_at``", signed with the coordinator's Ed25519 key. The signed message is the canonical
JSON (:func:`fedtune.compliance.canonical.canonical_json`) of::

    {"format": "fedtune.audit.checkpoint/v1", "key_id": ..., "root_hash": <64 hex>,
     "signed_at": <RFC 3339 UTC, microseconds>, "tree_size": <int>}

and the signature is stored and exported in base64. ``key_id`` is
:func:`fedtune.compliance.signing.key_id`: the first 16 hex digits of SHA-256 over the raw
32-byte public key; it names the key, the signature is what proves it.

The coordinator's key is a PEM (PKCS#8) Ed25519 private key file, mode 0600, named by
``FEDTUNE_COORDINATOR_KEY_FILE``; ``fedtune audit keygen --out FILE`` writes one.

Plain Python only (no database): the offline verifier imports this module.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedtune.compliance.canonical import canonical_json, format_timestamp, parse_timestamp
from fedtune.compliance.signing import KeyFormatError, key_id, load_private_key, sign_message, verify_signature

CHECKPOINT_FORMAT = "fedtune.audit.checkpoint/v1"
COORDINATOR_KEY_ENV = "FEDTUNE_COORDINATOR_KEY_FILE"


class CoordinatorKeyError(KeyFormatError):
    """The coordinator's checkpoint key is not configured, missing, too open, or not Ed25519."""


class CheckpointFormatError(ValueError):
    """A checkpoint (file or dict) is not a well-formed fedtune checkpoint."""


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement of the audit log's size and Merkle root."""

    tree_size: int
    root_hash: str  # 64 lowercase hex digits
    signed_at: datetime  # UTC
    key_id: str
    signature: str  # base64 of the 64-byte Ed25519 signature over signed_message()

    def signed_message(self) -> bytes:
        """The bytes the signature covers (see the module docstring)."""
        return checkpoint_message(self.tree_size, self.root_hash, self.signed_at, self.key_id)

    def verify(self, public_key: Ed25519PublicKey) -> bool:
        """True exactly when ``public_key`` is the key named by ``key_id`` and the signature holds."""
        try:
            signature = base64.b64decode(self.signature, validate=True)
        except (binascii.Error, ValueError):
            return False
        return key_id(public_key) == self.key_id and verify_signature(public_key, self.signed_message(), signature)

    def to_dict(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "tree_size": self.tree_size, "root_hash": self.root_hash,
                "signed_at": format_timestamp(self.signed_at), "key_id": self.key_id, "signature": self.signature}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Checkpoint:
        """Raises CheckpointFormatError naming the bad field."""
        if not isinstance(data, Mapping) or data.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointFormatError(f"not a {CHECKPOINT_FORMAT} checkpoint (format "
                                        f"{data.get('format') if isinstance(data, Mapping) else data!r:.60})")
        size, root = data.get("tree_size"), data.get("root_hash")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CheckpointFormatError(f"checkpoint tree_size {size!r} is not a non-negative integer")
        if not _is_hex_hash(root):
            raise CheckpointFormatError(f"checkpoint root_hash {root!r:.80} is not 64 lowercase hex digits")
        for name in ("signed_at", "key_id", "signature"):
            if not isinstance(data.get(name), str):
                raise CheckpointFormatError(f"checkpoint {name} is missing or not text")
        try:
            signed_at = parse_timestamp(data["signed_at"])
        except ValueError as e:
            raise CheckpointFormatError(f"checkpoint signed_at {data['signed_at']!r} is not "
                                        f"RFC 3339 UTC with microseconds") from e
        return cls(tree_size=size, root_hash=root, signed_at=signed_at, key_id=data["key_id"],
                   signature=data["signature"])

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        """Read a checkpoint JSON file (``checkpoint.json`` of an export).

        Raises:
            CheckpointFormatError: not JSON, or not a checkpoint.
        """
        try:
            data = json.loads(Path(path).read_bytes())
        except (OSError, ValueError) as e:
            raise CheckpointFormatError(f"{path}: cannot read a checkpoint: {e}") from e
        return cls.from_dict(data)


def _is_hex_hash(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def checkpoint_message(tree_size: int, root_hash: str, signed_at: datetime, signer: str) -> bytes:
    """The canonical bytes a checkpoint signature covers."""
    return canonical_json({"format": CHECKPOINT_FORMAT, "key_id": signer, "root_hash": root_hash,
                           "signed_at": format_timestamp(signed_at), "tree_size": tree_size})


def sign_checkpoint(private_key: Ed25519PrivateKey, tree_size: int, root: bytes,
                    signed_at: datetime | None = None) -> Checkpoint:
    """Sign a checkpoint of a log of ``tree_size`` records with Merkle root ``root`` (32 bytes).

    ``signed_at`` (default now) is kept to the microsecond, as it is written and stored.
    """
    if len(root) != 32:
        raise ValueError(f"a Merkle root has 32 bytes, not {len(root)}")
    signed_at = (signed_at or datetime.now(UTC)).astimezone(UTC)
    signer = key_id(private_key)
    message = checkpoint_message(tree_size, root.hex(), signed_at, signer)
    signature = base64.b64encode(sign_message(private_key, message)).decode("ascii")
    return Checkpoint(tree_size=tree_size, root_hash=root.hex(), signed_at=signed_at, key_id=signer,
                      signature=signature)


def load_coordinator_key(path: str | Path | None = None, environ: Mapping[str, str] | None = None
                         ) -> Ed25519PrivateKey:
    """The coordinator's Ed25519 checkpoint key from ``path`` or ``$FEDTUNE_COORDINATOR_KEY_FILE``.

    Raises:
        CoordinatorKeyError: no path and the variable is unset; the file is missing, readable by
            group or others, or holds no Ed25519 private key.
    """
    environ = os.environ if environ is None else environ
    if path is None:
        path = environ.get(COORDINATOR_KEY_ENV)
        if not path:
            raise CoordinatorKeyError(
                f"no coordinator signing key: set {COORDINATOR_KEY_ENV} to an Ed25519 private key file "
                f"(PEM, mode 0600); create one with: fedtune audit keygen --out coordinator-key.pem")
    path = Path(path)
    if not path.is_file():
        raise CoordinatorKeyError(f"coordinator signing key {path}: no such file")
    try:
        return load_private_key(path)
    except KeyFormatError as e:
        raise CoordinatorKeyError(f"coordinator signing key: {e}") from e


def configured_coordinator_key(environ: Mapping[str, str] | None = None) -> Ed25519PrivateKey | None:
    """The key named by ``$FEDTUNE_COORDINATOR_KEY_FILE``, or None when the variable is unset.

    Raises:
        CoordinatorKeyError: the variable is set but the file is unusable (never silently unsigned).
    """
    environ = os.environ if environ is None else environ
    if not environ.get(COORDINATOR_KEY_ENV):
        return None
    return load_coordinator_key(environ=environ)
