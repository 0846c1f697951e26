"""The offline verifier of an audit export (layout: :mod:`fedtune.compliance.bundle`): files,
signatures, chain, Merkle root, consistency.

Needs the export directory and, to know WHO signed, the coordinator's public key; no database,
no network (this module imports nothing from the coordinator). What it checks, in order:

1. ``manifest``: ``manifest.sig`` is the key's signature over ``manifest.json``; every file the
   manifest lists has its SHA-256;
2. ``key``: the export's ``public_key.pem`` is the trusted key (``pubkey``), when one is given;
3. ``signature``: ``checkpoint.json`` is signed by the key;
4. ``record`` / ``content`` / ``chain`` / ``sequence``: every record, see
   :mod:`fedtune.compliance.chain`;
5. ``merkle``: a complete export holds exactly seq 1..tree_size and their RFC 6962 root is the
   checkpoint's; a filtered export carries, per record, an inclusion proof against that root;
   ``history``: in a complete export, the roots the log's own ``audit.checkpoint_signed``
   records state are the roots its records give (this narrows a change down to the records
   between two checkpoints);
6. ``consistency`` (given an earlier checkpoint): the earlier log is a prefix of this one.

The result names every problem found and the first bad record (the lowest seq a problem names).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedtune.compliance.bundle import (
    CHECKPOINT_FILE,
    EXPORT_FORMAT,
    MANIFEST_FILE,
    MANIFEST_SIGNATURE_FILE,
    PROOFS_FILE,
    PUBLIC_KEY_FILE,
)
from fedtune.compliance.chain import Problem, check_announced_roots, walk_chain
from fedtune.compliance.checkpoints import Checkpoint, CheckpointFormatError
from fedtune.compliance.formats import RECORD_FORMATS, RecordFileError
from fedtune.compliance.merkle import MerkleTree, leaf_hash, verify_consistency, verify_inclusion
from fedtune.compliance.signing import KeyFormatError, key_id, load_public_key, verify_signature


@dataclass
class VerifyResult:
    """What :func:`verify_export` found. ``ok`` only when every check held."""

    export_dir: Path
    problems: list[Problem] = field(default_factory=list)
    records: int = 0
    complete: bool | None = None
    tree_size: int | None = None
    root_hash: str | None = None
    key_id: str | None = None
    key_source: str | None = None  # "trusted" (the pubkey given) or "export" (the export's own key)
    since_tree_size: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad_seq(self) -> int | None:
        """The lowest seq any problem names (None when no problem names a record)."""
        seqs = [p.seq for p in self.problems if p.seq is not None]
        return min(seqs) if seqs else None

    @property
    def first_problem(self) -> Problem | None:
        """The problem at the first bad record, else the first problem found."""
        first = self.first_bad_seq
        return next((p for p in self.problems if p.seq == first), None) if first is not None else (
            self.problems[0] if self.problems else None)

    def summary(self) -> str:
        """One paragraph for people: what holds, or where it first fails and why."""
        if self.ok:
            scope = "all records" if self.complete else "a filtered selection of records, each proven included"
            lines = [f"OK: {self.records} records ({scope}) under checkpoint tree_size={self.tree_size} "
                     f"root={self.root_hash} signed by key {self.key_id}"]
            if self.since_tree_size is not None:
                lines.append(f"consistent with the earlier checkpoint of {self.since_tree_size} records")
            if self.key_source == "export":
                lines.append("WARNING: the key came from the export itself; pass --pubkey with the coordinator's "
                             "key, obtained separately, to know who signed")
            return "\n".join(lines)
        first = self.first_problem
        head = (f"FAILED at seq {self.first_bad_seq}: {first}" if self.first_bad_seq is not None
                else f"FAILED: {first}")
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


_T = TypeVar("_T")


class _Stop(Exception):
    """A problem after which nothing further can be checked."""


def verify_export(export_dir: str | Path, pubkey: Ed25519PublicKey | str | Path | None = None,
                  since_checkpoint: Checkpoint | str | Path | None = None) -> VerifyResult:
    """Verify an audit export offline (see the module docstring).

    Args:
        export_dir: the directory ``fedtune audit export`` wrote.
        pubkey: the coordinator's public key (key object or PEM / ``ed25519:`` file), obtained
            separately. Without it the export's own ``public_key.pem`` is used, which proves
            integrity relative to that key only (``key_source == "export"``).
        since_checkpoint: an earlier checkpoint (object, ``checkpoint.json`` file, or an earlier
            export directory) that this export must extend.

    Returns:
        A :class:`VerifyResult`; ``ok`` is True only when every check holds.
    """
    result = VerifyResult(export_dir=Path(export_dir))
    with contextlib.suppress(_Stop):  # what stopped the checks is in result.problems already
        _verify(result, Path(export_dir), pubkey, since_checkpoint)
    return result


def _verify(result: VerifyResult, root: Path, pubkey: Any, since: Any) -> None:
    problems = result.problems
    manifest = _read_manifest(root, problems)
    key = _choose_key(root, manifest, pubkey, result)
    _check_manifest(root, manifest, key, problems)
    checkpoint = _read_checkpoint(root / CHECKPOINT_FILE, problems)
    result.tree_size, result.root_hash = checkpoint.tree_size, checkpoint.root_hash
    if not checkpoint.verify(key):
        problems.append(Problem(None, "signature", f"checkpoint.json (tree_size {checkpoint.tree_size}, key id "
                                                   f"{checkpoint.key_id}) is not signed by key {key_id(key)}"))
    if manifest.get("tree_size") != checkpoint.tree_size:
        problems.append(Problem(None, "manifest", f"the manifest says tree_size {manifest.get('tree_size')}, the "
                                                  f"checkpoint {checkpoint.tree_size}"))
    records = _read_records(root, manifest, problems)
    result.records, result.complete = len(records), manifest.get("complete") is not False
    walk = walk_chain(records, complete=result.complete)
    problems.extend(walk.problems)
    root_hash = bytes.fromhex(checkpoint.root_hash)
    proofs = _read_proofs(root, problems)
    tree = None
    if result.complete:
        tree = _check_complete(records, walk.leaves, checkpoint, problems)
    else:
        _check_inclusions(records, walk.leaves, checkpoint.tree_size, root_hash, proofs, problems)
    if since is not None:
        earlier = _earlier_checkpoint(since, problems)
        result.since_tree_size = earlier.tree_size
        _check_since(earlier, since, key, checkpoint, tree if result.complete else None, proofs, walk.leaves,
                     problems)


def _read_file(path: Path, read: Callable[[Path], _T], check: str, label: str, problems: list[Problem],
               errors: Mapping[type[Exception], str]) -> _T:
    """``read(path)``; when it raises one of ``errors`` (the first that matches, in order), the problem
    ``errors[kind]`` (formatted with ``label`` and ``error``) under ``check``, and the checks stop."""
    try:
        return read(path)
    except tuple(errors) as e:
        message = next(m for kind, m in errors.items() if isinstance(e, kind))
        problems.append(Problem(None, check, message.format(label=label, error=e)))
    raise _Stop


_JSON_ERRORS = {FileNotFoundError: "{label} is missing", OSError: "{label} cannot be read: {error}",
                ValueError: "{label} is not JSON: {error}"}
_RECORDS_ERRORS = {OSError: "{label} cannot be read: {error}", RecordFileError: "{label} {error}"}


def _read_json(path: Path, what: str, problems: list[Problem]) -> Any:
    return _read_file(path, lambda p: json.loads(p.read_bytes()), "manifest", f"{what} {path.name}", problems,
                      _JSON_ERRORS)


def _read_manifest(root: Path, problems: list[Problem]) -> dict[str, Any]:
    if not root.is_dir():
        problems.append(Problem(None, "manifest", f"{root} is not a directory"))
        raise _Stop
    manifest = _read_json(root / MANIFEST_FILE, "the manifest", problems)
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        problems.append(Problem(None, "manifest", f"manifest.json is not a {EXPORT_FORMAT} manifest"))
        raise _Stop
    if not isinstance(manifest.get("files"), dict):
        problems.append(Problem(None, "manifest", "manifest.json lists no files"))
        raise _Stop
    return manifest


def _choose_key(root: Path, manifest: Mapping[str, Any], pubkey: Any, result: VerifyResult) -> Ed25519PublicKey:
    exported = None
    try:
        exported = load_public_key(root / PUBLIC_KEY_FILE)
    except (OSError, KeyFormatError) as e:
        if pubkey is None:
            result.problems.append(Problem(None, "key", f"no usable public key in the export ({e}); pass --pubkey"))
            raise _Stop from e
    if pubkey is None:
        key, result.key_source = exported, "export"
    else:
        try:
            key = pubkey if isinstance(pubkey, Ed25519PublicKey) else load_public_key(pubkey)
        except (OSError, KeyFormatError) as e:
            result.problems.append(Problem(None, "key", f"the trusted public key cannot be read: {e}"))
            raise _Stop from e
        result.key_source = "trusted"
        if exported is not None and key_id(exported) != key_id(key):
            result.problems.append(Problem(None, "key", f"the export's public_key.pem is key {key_id(exported)}, "
                                                        f"not the trusted key {key_id(key)}: the export was "
                                                        f"signed by someone else"))
    result.key_id = key_id(key)
    return key


def _check_manifest(root: Path, manifest: Mapping[str, Any], key: Ed25519PublicKey, problems: list[Problem]) -> None:
    try:
        signature = base64.b64decode((root / MANIFEST_SIGNATURE_FILE).read_bytes().strip(), validate=True)
    except (OSError, binascii.Error, ValueError):
        signature = b""
    if not verify_signature(key, (root / MANIFEST_FILE).read_bytes(), signature):
        problems.append(Problem(None, "manifest", f"manifest.sig is not key {key_id(key)}'s signature over "
                                                  f"manifest.json"))
    files = manifest["files"]
    for required in (manifest.get("records_file"), CHECKPOINT_FILE, PUBLIC_KEY_FILE, PROOFS_FILE):
        if required not in files:
            problems.append(Problem(None, "manifest", f"the manifest does not list {required}"))
    for name, digest in sorted(files.items()):
        path = root / name
        if Path(name).name != name or not path.is_file():
            problems.append(Problem(None, "manifest", f"{name} (listed in the manifest) is missing"))
            continue
        actual = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != digest:
            problems.append(Problem(None, "manifest", f"{name} has SHA-256 {actual[7:23]}..., the manifest says "
                                                      f"{str(digest)[7:23]}...: the file was changed"))


def _read_checkpoint(path: Path, problems: list[Problem]) -> Checkpoint:
    try:
        return Checkpoint.load(path)
    except CheckpointFormatError as e:
        problems.append(Problem(None, "signature", str(e)))
        raise _Stop from e


def _read_records(root: Path, manifest: Mapping[str, Any], problems: list[Problem]) -> list[dict[str, Any]]:
    fmt = RECORD_FORMATS.get(str(manifest.get("record_format")))
    name = manifest.get("records_file")
    if fmt is None or not isinstance(name, str) or Path(name).name != name:
        problems.append(Problem(None, "manifest", f"unknown record format {manifest.get('record_format')!r} or "
                                                  f"records file {name!r}"))
        raise _Stop
    return _read_file(root / name, fmt.read, "record", name, problems, _RECORDS_ERRORS)


def _read_proofs(root: Path, problems: list[Problem]) -> dict[str, Any]:
    path = root / PROOFS_FILE
    if not path.exists():
        return {}
    proofs = _read_json(path, "the proofs file", problems)
    return proofs if isinstance(proofs, dict) else {}


def _check_complete(records: Sequence[Mapping[str, Any]], leaves: Sequence[bytes | None], checkpoint: Checkpoint,
                    problems: list[Problem]) -> MerkleTree | None:
    size = checkpoint.tree_size
    if len(records) < size:
        problems.append(Problem(len(records) + 1, "sequence", f"the records end after {len(records)} records, the "
                                                              f"signed checkpoint covers {size}: seq "
                                                              f"{len(records) + 1}..{size} are missing (truncated)"))
    elif len(records) > size:
        problems.append(Problem(size + 1, "sequence", f"{len(records) - size} records beyond the {size} the signed "
                                                      f"checkpoint covers (appended after signing?)"))
    if any(leaf is None for leaf in leaves):
        return None
    tree = MerkleTree.from_leaves(leaves)  # type: ignore[arg-type]
    if len(records) >= size and tree.root(size).hex() != checkpoint.root_hash:
        problems.append(Problem(None, "merkle", f"the Merkle root of seq 1..{size} is not the signed root "
                                                f"{checkpoint.root_hash[:16]}...: records were changed"))
    history = check_announced_roots(records, tree)
    if history is not None:
        problems.append(history)
    return tree


def _check_inclusions(records: Sequence[Mapping[str, Any]], leaves: Sequence[bytes | None], size: int,
                      root: bytes, proofs: Mapping[str, Any], problems: list[Problem]) -> None:
    inclusion = proofs.get("inclusion") if isinstance(proofs.get("inclusion"), dict) else {}
    if proofs.get("tree_size") != size:
        problems.append(Problem(None, "merkle", f"proofs.json is for tree_size {proofs.get('tree_size')}, the "
                                                f"checkpoint for {size}"))
    for record, leaf in zip(records, leaves, strict=True):
        seq = record.get("seq")
        if leaf is None or not isinstance(seq, int):
            continue
        proof = _hashes(inclusion.get(str(seq)))
        if proof is None or not verify_inclusion(leaf_hash(leaf), seq - 1, size, proof, root):
            problems.append(Problem(seq, "merkle", f"seq {seq} is not proven included in the signed log of {size} "
                                                   f"records (missing or failing inclusion proof)"))


def _hashes(value: Any) -> list[bytes] | None:
    if not isinstance(value, list):
        return None
    try:
        return [bytes.fromhex(h) for h in value]
    except (TypeError, ValueError):
        return None


def _earlier_checkpoint(since: Any, problems: list[Problem]) -> Checkpoint:
    if isinstance(since, Checkpoint):
        return since
    path = Path(since)
    try:
        return Checkpoint.load(path / CHECKPOINT_FILE if path.is_dir() else path)
    except CheckpointFormatError as e:
        problems.append(Problem(None, "consistency", f"the earlier checkpoint cannot be read: {e}"))
        raise _Stop from e


def _check_since(earlier: Checkpoint, since: Any, key: Ed25519PublicKey, checkpoint: Checkpoint,
                 tree: MerkleTree | None, proofs: Mapping[str, Any], leaves: Sequence[bytes | None],
                 problems: list[Problem]) -> None:
    m, n = earlier.tree_size, checkpoint.tree_size
    if not earlier.verify(key):
        problems.append(Problem(None, "consistency", f"the earlier checkpoint (tree_size {m}, key id "
                                                     f"{earlier.key_id}) is not signed by key {key_id(key)}: the "
                                                     f"log was re-signed with another key"))
        return
    if m > n:
        problems.append(Problem(None, "consistency", f"the earlier checkpoint covers {m} records, this export's "
                                                     f"only {n}: records were removed"))
        return
    old_root, new_root = bytes.fromhex(earlier.root_hash), bytes.fromhex(checkpoint.root_hash)
    if tree is not None:  # a complete export: the proof is computed from its own records
        if tree.size < n:
            problems.append(Problem(None, "consistency", "not checked: the records do not form the signed log"))
            return
        proof: list[bytes] | None = tree.consistency_proof(m, n)
    else:
        table = proofs.get("consistency") if isinstance(proofs.get("consistency"), dict) else {}
        proof = _hashes(table.get(str(m))) if m not in (0, n) else []
        if proof is None:
            problems.append(Problem(None, "consistency", f"this filtered export has no consistency proof from size "
                                                         f"{m}; export the full log to check against that checkpoint"))
            return
    if not verify_consistency(m, n, old_root, new_root, proof):
        first = _first_difference(since, key, leaves, m)
        problems.append(Problem(first, "consistency", f"the log is not an extension of the earlier checkpoint "
                                                      f"(tree_size {m}, signed at {earlier.to_dict()['signed_at']}): "
                                                      f"records 1..{m} were changed since"
                                                      + (f"; seq {first} is the first that differs from the earlier "
                                                         f"export" if first is not None else "")))


def _first_difference(since: Any, key: Ed25519PublicKey, leaves: Sequence[bytes | None], m: int) -> int | None:
    """With an earlier (sound, complete) export directory, the first seq whose canonical record differs."""
    if isinstance(since, Checkpoint) or not Path(since).is_dir():
        return None
    earlier = verify_export(since, pubkey=key)
    if not earlier.ok or not earlier.complete:
        return None
    manifest = json.loads((Path(since) / MANIFEST_FILE).read_bytes())
    old_records = RECORD_FORMATS[manifest["record_format"]].read(Path(since) / manifest["records_file"])
    old_leaves = walk_chain(old_records).leaves
    for seq in range(1, m + 1):
        if seq > len(leaves) or leaves[seq - 1] != old_leaves[seq - 1]:
            return seq
    return None
