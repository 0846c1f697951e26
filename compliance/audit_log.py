"""The audit log's logic, over the narrow storage interface it reads and extends a stored log through.

Trillian keeps a log's logic apart from its storage: the log server decides what a sound log is and
what to sign; the storage only stores. Here too. This module says:

* what a sound stored log is (:func:`read_checked_log`): its hash chain holds from seq 1 (the same
  walk as the offline verifier, :mod:`fedtune.compliance.chain`), the roots its own
  ``audit.checkpoint_signed`` records state are the roots its records give, and its first
  ``tree_size`` records still have the Merkle root of the newest stored checkpoint;
* how a checkpoint is signed over it (:func:`seal_checkpoint`): under the append lock, after
  confirming that the stored log still ends with the record that was read, sign the RFC 6962 root
  of every record so far, store the checkpoint and announce it with an ``audit.checkpoint_signed``
  record (covered by the NEXT checkpoint).

:class:`AuditLogStorage` is what the coordinator's store implements
(``fedtune.coordinator.store.audit.StoredAuditLog``); :class:`AuditLogSource` is what an export
reads a log through (:func:`fedtune.compliance.export.export_audit_log`). Nothing here knows SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtune.compliance.canonical import format_timestamp
from fedtune.compliance.chain import check_announced_roots, walk_chain
from fedtune.compliance.checkpoints import Checkpoint, sign_checkpoint
from fedtune.compliance.merkle import MerkleTree

CHECKPOINT_ACTOR_TYPE = "coordinator"
CHECKPOINT_ACTOR_ID = "audit-log"


class AuditIntegrityError(RuntimeError):
    """The stored audit log no longer matches its own chain or an earlier signed checkpoint (it was
    changed behind the append-only triggers); nothing is signed over it."""


@dataclass(frozen=True)
class StoredCheckpoint:
    """A checkpoint as the storage keeps it: its number there (``#id`` in messages) and what was signed."""

    id: int
    checkpoint: Checkpoint


class AuditLogStorage(Protocol):
    """How the log's logic reads and extends a stored audit log, all inside the caller's transaction."""

    def records(self) -> list[dict[str, Any]]:
        """Every record in seq order, as exported (``occurred_at`` as RFC 3339 text)."""
        ...

    def newest_checkpoint(self) -> StoredCheckpoint | None:
        """The checkpoint stored last, if any."""
        ...

    def lock(self) -> None:
        """Take the append lock for the rest of the transaction (no record is appended meanwhile)."""
        ...

    def record_hash(self, seq: int) -> str | None:
        """The stored ``record_hash`` of record ``seq``; None when there is no such record."""
        ...

    def add_checkpoint(self, checkpoint: Checkpoint) -> StoredCheckpoint:
        """Store a signed checkpoint."""
        ...

    def append_record(self, *, action: str, actor_type: str, actor_id: str, resource_type: str,
                      resource_id: str | None, outcome: str, context: dict[str, Any]) -> None:
        """Append one hash-chained record (under the lock already held)."""
        ...

    def checkpoint_sizes(self) -> list[int]:
        """The ``tree_size`` of every stored checkpoint."""
        ...


@dataclass(frozen=True)
class AuditSnapshot:
    """The log as a signed checkpoint covers it: its records (seq 1..tree_size), their Merkle tree,
    the checkpoint, and the tree sizes of every stored checkpoint up to it (this one included)."""

    records: list[dict[str, Any]]
    tree: MerkleTree
    checkpoint: StoredCheckpoint
    checkpoint_sizes: list[int]


class AuditLogSource(Protocol):
    """What an export reads a log through: a freshly signed checkpoint and the records it covers."""

    def snapshot(self, signing_key: Ed25519PrivateKey, *, signed_at: datetime | None = None) -> AuditSnapshot:
        """Sign (and store) a checkpoint of every record so far; :func:`seal_checkpoint`.

        Raises:
            AuditIntegrityError: the stored log is not sound (:func:`read_checked_log`).
        """
        ...


def read_checked_log(storage: AuditLogStorage) -> tuple[list[dict[str, Any]], MerkleTree]:
    """Every record in seq order and the Merkle tree over their canonical bytes, once the stored
    log is found sound (see the module docstring). Take the storage's lock first when the result is
    signed or exported, or confirm it under the lock (:func:`seal_checkpoint`).

    Raises:
        AuditIntegrityError: the chain breaks, a checkpoint record states a root the records no
            longer give, or the first ``tree_size`` records of the newest stored checkpoint no
            longer have its root.
    """
    records = storage.records()
    walk = walk_chain(records, complete=True)
    if not walk.ok:
        more = f" (and {len(walk.problems) - 1} more problems)" if len(walk.problems) > 1 else ""
        raise AuditIntegrityError(f"the stored audit log is not sound: {walk.problems[0]}{more}")
    tree = MerkleTree.from_leaves(leaf for leaf in walk.leaves if leaf is not None)
    problem = check_announced_roots(records, tree)
    if problem is not None:
        raise AuditIntegrityError(f"the stored audit log is not sound: {problem}")
    _check_newest_checkpoint(storage.newest_checkpoint(), tree)
    return records, tree


def _check_newest_checkpoint(newest: StoredCheckpoint | None, tree: MerkleTree) -> None:
    if newest is None:
        return
    signed = newest.checkpoint
    if signed.tree_size > tree.size:
        raise AuditIntegrityError(f"checkpoint #{newest.id} covers {signed.tree_size} records, the log has only "
                                  f"{tree.size}: records were deleted")
    if tree.root(signed.tree_size).hex() != signed.root_hash:
        raise AuditIntegrityError(f"records 1..{signed.tree_size} no longer have the Merkle root signed in "
                                  f"checkpoint #{newest.id} at {format_timestamp(signed.signed_at)}: they were "
                                  f"changed after it was signed")


def seal_checkpoint(storage: AuditLogStorage, records: Sequence[dict[str, Any]], tree: MerkleTree,
                    signing_key: Ed25519PrivateKey, *, signed_at: datetime | None = None,
                    confirm: bool = False) -> AuditSnapshot:
    """Sign a checkpoint of ``records`` (read by :func:`read_checked_log`) and store and announce it.

    The checkpoint covers seq 1..n (n = the records read); the ``audit.checkpoint_signed`` record
    that announces it is seq n + 1, covered by the next checkpoint.

    Args:
        storage: the log, in the transaction the checkpoint commits with.
        records, tree: what :func:`read_checked_log` returned.
        signing_key: the coordinator's Ed25519 key.
        signed_at: the signing time (default now).
        confirm: the records were read without the lock (another snapshot of the store): check,
            under the lock, that the stored log still has the last of them (it is append-only, so
            it then begins with all of them).

    Raises:
        AuditIntegrityError: the last record read is no longer stored as it was read.
    """
    storage.lock()
    if confirm and records:
        last = records[-1]
        if storage.record_hash(last["seq"]) != last["record_hash"]:
            raise AuditIntegrityError(f"audit record {last['seq']} changed while the log was read for a checkpoint")
    stored = storage.add_checkpoint(sign_checkpoint(signing_key, tree.size, tree.root(), signed_at))
    signed = stored.checkpoint
    storage.append_record(action="audit.checkpoint_signed", actor_type=CHECKPOINT_ACTOR_TYPE,
                          actor_id=CHECKPOINT_ACTOR_ID, resource_type="audit_checkpoint", resource_id=str(stored.id),
                          outcome="success", context={"tree_size": signed.tree_size, "root_hash": signed.root_hash,
                                                      "key_id": signed.key_id,
                                                      "signed_at": format_timestamp(signed.signed_at)})
    # checkpoints signed meanwhile over a longer log are not this snapshot's to prove consistency with
    sizes = sorted(m for m in set(storage.checkpoint_sizes()) if m <= tree.size)
    return AuditSnapshot(records=list(records), tree=tree, checkpoint=stored, checkpoint_sizes=sizes)
