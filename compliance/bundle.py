"""The audit export directory: what it holds and how it is written.

::

    DIR/
      records.jsonl | records.csv   the records (fedtune.compliance.formats), chain fields included
      checkpoint.json               the signed checkpoint the records are checked against
      public_key.pem                the coordinator's public key (a convenience: trust a copy
                                    obtained separately, `fedtune audit verify --pubkey`)
      proofs.json                   {"tree_size": n, "inclusion": {seq: [hex, ...]},
                                     "consistency": {earlier size: [hex, ...]}}; filled for
                                    filtered exports only (a complete one proves itself)
      manifest.json                 format, filter, counts, tree size, key id and the SHA-256 of
                                    every other file ("sha256:<hex>")
      manifest.sig                  base64 Ed25519 signature of manifest.json's exact bytes

A complete export holds seq 1..tree_size: its chain and Merkle root are recomputed by the
verifier. A filtered export (``complete: false``; by job and/or time) holds the matching records
only: the chain is broken wherever records are left out, so each record carries its RFC 6962
inclusion proof against the signed root instead, and consistency proofs from every earlier stored
checkpoint come along. What a filtered export cannot prove by hashes alone is that no matching
record was left out: that is the coordinator's signed statement (the filter in the signed manifest).

Plain Python only (no database).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtune.compliance.canonical import format_timestamp
from fedtune.compliance.checkpoints import Checkpoint
from fedtune.compliance.formats import RECORD_FORMATS
from fedtune.compliance.signing import key_id, public_key_pem, sign_message

EXPORT_FORMAT = "fedtune.audit.export/v1"
MANIFEST_FILE = "manifest.json"
MANIFEST_SIGNATURE_FILE = "manifest.sig"
CHECKPOINT_FILE = "checkpoint.json"
PUBLIC_KEY_FILE = "public_key.pem"
PROOFS_FILE = "proofs.json"


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _prepare_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory; export into a new one")
    out_dir.mkdir(parents=True, exist_ok=True)


def write_export_bundle(out_dir: str | Path, *, records: Sequence[Mapping[str, Any]], checkpoint: Checkpoint,
                        signing_key: Ed25519PrivateKey, record_format: str = "jsonl", complete: bool = True,
                        filter_description: Mapping[str, Any] | None = None,
                        proofs: Mapping[str, Any] | None = None, exported_at: datetime) -> dict[str, str]:
    """Write an export directory (see the module docstring); the manifest comes last.

    Args:
        out_dir: a new or empty directory.
        records: the records to export, in seq order, with their chain fields.
        checkpoint: the signed checkpoint they are checked against.
        signing_key: the key that signed ``checkpoint``; it signs the manifest too.
        record_format: a key of :data:`fedtune.compliance.formats.RECORD_FORMATS`.
        complete: the records are seq 1..checkpoint.tree_size (no filter).
        filter_description: what selected the records (written into the manifest).
        proofs: ``{"inclusion": {...}, "consistency": {...}}`` (filtered exports).
        exported_at: when (timezone-aware).

    Returns:
        ``{file name: "sha256:<hex>"}`` of every file but the manifest and its signature.

    Raises:
        FileExistsError: ``out_dir`` is not new or empty.
        ValueError: an unknown record format.
    """
    fmt = RECORD_FORMATS.get(record_format)
    if fmt is None:
        raise ValueError(f"record format {record_format!r}: choose one of {', '.join(RECORD_FORMATS)}")
    out_dir = Path(out_dir)
    _prepare_dir(out_dir)
    fmt.write(records, out_dir / fmt.filename)
    (out_dir / CHECKPOINT_FILE).write_bytes(_json_bytes(checkpoint.to_dict()))
    (out_dir / PUBLIC_KEY_FILE).write_bytes(public_key_pem(signing_key))
    proofs = dict(proofs or {})
    (out_dir / PROOFS_FILE).write_bytes(_json_bytes({"tree_size": checkpoint.tree_size,
                                                     "inclusion": proofs.get("inclusion", {}),
                                                     "consistency": proofs.get("consistency", {})}))
    files = {name: "sha256:" + hashlib.sha256((out_dir / name).read_bytes()).hexdigest()
             for name in (fmt.filename, CHECKPOINT_FILE, PUBLIC_KEY_FILE, PROOFS_FILE)}
    manifest = _json_bytes({
        "format": EXPORT_FORMAT, "exported_at": format_timestamp(exported_at), "record_format": record_format,
        "records_file": fmt.filename, "records": len(records), "complete": complete,
        "filter": dict(filter_description or {}), "tree_size": checkpoint.tree_size, "key_id": key_id(signing_key),
        "files": files,
    })
    (out_dir / MANIFEST_FILE).write_bytes(manifest)
    signature = base64.b64encode(sign_message(signing_key, manifest)).decode("ascii")
    (out_dir / MANIFEST_SIGNATURE_FILE).write_text(signature + "\n", encoding="ascii")
    return files
