"""Walking the hash chain of a sequence of audit records and naming the first place it breaks.

Used by the offline verifier (records read from an export) and by the coordinator before it signs
a checkpoint (records read from the store): both must agree on what a sound log is.

Four checks per record, in log order:

* ``record``: the record has every field, an integer ``seq`` and canonical values;
* ``content``: ``record_hash == SHA-256(prev_hash || canonical record)`` (a field was changed);
* ``chain``: ``prev_hash`` is the previous record's ``record_hash`` (genesis for seq 1) (a record
  was changed and re-hashed, or one before it was removed or moved);
* ``sequence``: a complete log holds seq 1, 2, 3, ... in order (a record was deleted, inserted or
  moved); a filtered export holds increasing seqs and is linked only where seqs are adjacent.

And over a complete log, ``history`` (:func:`check_announced_roots`): the roots that the log's own
``audit.checkpoint_signed`` records state are the roots its records give.

Plain Python only: the offline verifier imports this module.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedtune.compliance.canonical import (
    CHAIN_FIELDS,
    GENESIS_HASH,
    RECORD_FIELDS,
    CanonicalFormError,
    canonical_record,
    chain_hash,
)
from fedtune.compliance.merkle import MerkleTree


@dataclass(frozen=True)
class Problem:
    """One failed check: where (the record's seq, None for the export as a whole), which check,
    and what is wrong, in words an auditor can act on."""

    seq: int | None
    check: str
    message: str

    def __str__(self) -> str:
        where = f"seq {self.seq}" if self.seq is not None else "export"
        return f"{where} [{self.check}]: {self.message}"


@dataclass
class ChainWalk:
    """What :func:`walk_chain` found: the canonical bytes of each record (the Merkle leaves, in the
    records' order; ``None`` where a record has no canonical form) and the problems."""

    leaves: list[bytes | None]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems


def walk_chain(records: Sequence[Mapping[str, Any]], *, complete: bool = True) -> ChainWalk:
    """Check the records' hash chain (see the module docstring).

    Args:
        records: audit records (dicts with :data:`RECORD_FIELDS` and :data:`CHAIN_FIELDS`), in the
            order they are stored or exported.
        complete: the records claim to be the whole log from seq 1 (False: a filtered export).

    Returns:
        The canonical leaves and the problems; the sequence and chain checks report only their
        first break (what follows a deleted or moved record breaks too, and says nothing new).
    """
    walk = ChainWalk(leaves=[], problems=[])
    counts = Counter(r.get("seq") for r in records if isinstance(r, Mapping))
    prev: Mapping[str, Any] | None = None
    order_broken = link_broken = False
    for position, record in enumerate(records, start=1):
        seq = record.get("seq") if isinstance(record, Mapping) else None
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            walk.leaves.append(None)
            walk.problems.append(Problem(None, "record", f"record {position} in the export has no valid seq "
                                                         f"({seq!r:.40})"))
            order_broken = link_broken = True
            continue
        walk.leaves.append(_check_content(record, seq, walk.problems))
        if not order_broken:
            expected = position if complete else (prev["seq"] + 1 if prev is not None else None)
            problem = _check_position(seq, expected, prev, counts, complete)
            if problem is not None:
                walk.problems.append(problem)
                order_broken = True
        if not link_broken and (complete or (prev is not None and prev["seq"] == seq - 1) or seq == 1):
            problem = _check_link(record, seq, prev if seq > 1 else None)
            if problem is not None:
                walk.problems.append(problem)
                link_broken = True
        prev = record
    return walk


def _check_content(record: Mapping[str, Any], seq: int, problems: list[Problem]) -> bytes | None:
    missing = [f for f in (*RECORD_FIELDS, *CHAIN_FIELDS) if f not in record]
    extra = sorted(set(record) - set(RECORD_FIELDS) - set(CHAIN_FIELDS))
    if missing or extra:
        problems.append(Problem(seq, "record", f"fields missing {missing} or unknown {extra}"))
        return None
    try:
        canonical = canonical_record(record)
        computed = chain_hash(record["prev_hash"], canonical)
    except CanonicalFormError as e:
        problems.append(Problem(seq, "record", str(e)))
        return None
    if computed != record["record_hash"]:
        problems.append(Problem(seq, "content", f"record_hash {str(record['record_hash'])[:16]}... does not match "
                                                f"the record's content (SHA-256 gives {computed[:16]}...): the "
                                                f"record was changed after it was written"))
    return canonical


def _check_position(seq: int, expected: int | None, prev: Mapping[str, Any] | None, counts: Counter,
                    complete: bool) -> Problem | None:
    if complete:
        if seq == expected:
            return None
        if counts[seq] > 1:
            return Problem(seq, "sequence", f"seq {seq} appears {counts[seq]} times: a record was inserted")
        if seq > expected and counts[expected] == 0:
            return Problem(expected, "sequence", f"seq {expected} is missing (the records go from seq "
                                                 f"{expected - 1} to seq {seq}): a record was deleted")
        return Problem(min(seq, expected), "sequence", f"records out of order: seq {seq} stands where seq "
                                                       f"{expected} belongs")
    if prev is not None and seq <= prev["seq"]:
        return Problem(seq, "sequence", f"seq {seq} follows seq {prev['seq']}: records out of order or inserted")
    return None


def _check_link(record: Mapping[str, Any], seq: int, prev: Mapping[str, Any] | None) -> Problem | None:
    if seq == 1:
        if record.get("prev_hash") != GENESIS_HASH:
            return Problem(seq, "chain", "seq 1's prev_hash is not the genesis value (64 zeros)")
        return None
    if prev is None or record.get("prev_hash") == prev.get("record_hash"):
        return None
    return Problem(seq, "chain", f"prev_hash does not match the record_hash of seq {prev.get('seq')}: that "
                                 f"record or this one was changed, or records between them were removed")


CHECKPOINT_ACTION = "audit.checkpoint_signed"


def check_announced_roots(records: Sequence[Mapping[str, Any]], tree: MerkleTree) -> Problem | None:
    """Compare the roots the log's own ``audit.checkpoint_signed`` records state (each the signed
    root of the records before it) with the roots the records give now; the first that differs
    narrows a change down to the records between it and the last one that matched.

    Args:
        records: the complete log, seq 1..n in order.
        tree: the Merkle tree over their canonical bytes.
    """
    good = 0
    for record in records:
        context = record.get("context")
        if record.get("action") != CHECKPOINT_ACTION or not isinstance(context, Mapping):
            continue
        size, stated = context.get("tree_size"), context.get("root_hash")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= tree.size:
            return Problem(record.get("seq"), "history", f"the checkpoint record states tree_size {size!r}, "
                                                         f"which is not a size of this log")
        if tree.root(size).hex() != stated:
            return Problem(None, "history", f"the checkpoint recorded at seq {record.get('seq')} states root "
                                            f"{str(stated)[:16]}... for seq 1..{size}, the records give "
                                            f"{tree.root(size).hex()[:16]}...: a record among seq "
                                            f"{good + 1}..{size} was changed after that checkpoint was signed")
        good = max(good, size)
    return None
