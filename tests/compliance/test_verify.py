"""Export and offline verification, on SQLite and PostgreSQL: untouched exports pass; each kind of
tampering with the exported files fails and names the spot; a log changed in the database behind
the triggers (by someone who cannot sign) is caught by the next export, or, when the whole log
was rewritten consistently, by verifying it against an earlier checkpoint."""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from fedtune.compliance.bundle import write_export_bundle
from fedtune.compliance.canonical import GENESIS_HASH, canonical_record, chain_hash
from fedtune.compliance.checkpoints import Checkpoint, sign_checkpoint
from fedtune.compliance.formats import RECORD_FORMATS
from fedtune.compliance.merkle import MerkleTree, merkle_root
from fedtune.compliance.signing import generate_signing_key, public_key_pem
from fedtune.compliance.verify import verify_export
from fedtune.coordinator.audit_export import export_audit
from fedtune.coordinator.rounds import run_job
from fedtune.coordinator.store import append_audit_event
from fedtune.coordinator.store.audit import AuditIntegrityError, sign_audit_checkpoint

FORMATS = sorted(RECORD_FORMATS)
T0 = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)


def _write_log(sessions, key, rounds=3):
    """Per round: two job-1 records and one job-2 record, then a checkpoint (its announcement is the
    round's 4th record). 3 rounds: seq 1..12; the checkpoint records are seq 4, 8, 12."""
    for r in range(rounds):
        with sessions.begin() as s:
            for i, (job, action) in enumerate([("job-1", "update.accepted"), ("job-1", "round.completed"),
                                               ("job-2", "job.started")]):
                append_audit_event(s, action=action, actor_type="coordinator", actor_id="round-engine",
                                   resource_type="round", resource_id=f"{job}/{r + 1}", outcome="success",
                                   occurred_at=T0 + timedelta(hours=r, minutes=i),
                                   context={"job_id": job, "round": r + 1, "epsilon": 0.5 + r, "delta": 1e-5})
            sign_audit_checkpoint(s, key, signed_at=T0 + timedelta(hours=r, minutes=30))


def _export(sessions, key, out, **kw):
    with sessions.begin() as s:
        return export_audit(s, out, signing_key=key, **kw)


def _records(export_dir):
    manifest = json.loads((export_dir / "manifest.json").read_bytes())
    fmt = RECORD_FORMATS[manifest["record_format"]]
    return fmt, fmt.read(export_dir / fmt.filename)


def _rewrite(export_dir, records):
    fmt, _ = _records(export_dir)
    fmt.write(records, export_dir / fmt.filename)


def _rechain(records):
    """What a forger does after editing records: recompute every hash (no key needed for that)."""
    prev = GENESIS_HASH
    for record in records:
        record["prev_hash"], record["record_hash"] = prev, chain_hash(prev, canonical_record(record))
        prev = record["record_hash"]
    return records


def _forge(records):
    """A thorough forger also restates the roots in the log's audit.checkpoint_signed records."""
    for record in records:
        if record["action"] == "audit.checkpoint_signed":
            size = record["context"]["tree_size"]
            record["context"]["root_hash"] = merkle_root(canonical_record(r) for r in records[:size]).hex()
    return _rechain(records)


@pytest.fixture
def log(sessions, coordinator_key):
    _write_log(sessions, coordinator_key)
    return sessions


@pytest.fixture(params=FORMATS)
def export_dir(request, log, coordinator_key, tmp_path):
    """A complete export of seq 1..12 (its checkpoint covers 12 records)."""
    _export(log, coordinator_key, tmp_path / "export", record_format=request.param)
    return tmp_path / "export"


def _verify(export_dir, key, **kw):
    return verify_export(export_dir, pubkey=key.public_key(), **kw)


def test_an_untouched_export_passes(export_dir, coordinator_key):
    result = _verify(export_dir, coordinator_key)
    assert result.ok, result.summary()
    assert (result.records, result.tree_size, result.complete, result.key_source) == (12, 12, True, "trusted")
    assert result.first_bad_seq is None and result.summary().startswith("OK: 12 records")
    manifest = json.loads((export_dir / "manifest.json").read_bytes())
    assert manifest["files"].keys() == {manifest["records_file"], "checkpoint.json", "public_key.pem", "proofs.json"}


def _first(result):
    assert not result.ok
    return result.first_bad_seq, result.first_problem.check


def test_edit_a_field(export_dir, coordinator_key):
    _, records = _records(export_dir)
    records[5]["outcome"] = "failure"
    _rewrite(export_dir, records)
    result = _verify(export_dir, coordinator_key)
    assert _first(result) == (6, "content")
    assert {p.check for p in result.problems} >= {"content", "manifest", "merkle"}


def test_insert_a_record(export_dir, coordinator_key):
    _, records = _records(export_dir)
    forged = {**records[5], "seq": 7, "event_id": str(uuid.uuid4()), "outcome": "failure",
              "prev_hash": records[5]["record_hash"]}
    forged["record_hash"] = chain_hash(forged["prev_hash"], canonical_record(forged))
    records.insert(6, forged)  # a well-formed, correctly chained record 7 in front of the real one
    _rewrite(export_dir, records)
    result = _verify(export_dir, coordinator_key)
    assert _first(result) == (7, "sequence")
    assert "seq 7 appears 2 times" in result.first_problem.message
    # Renumbering everything after it and re-chaining hides nothing either.
    renumbered = _rechain([*records[:7], *({**r, "seq": r["seq"] + 1} for r in records[7:])])
    _rewrite(export_dir, renumbered)
    result = _verify(export_dir, coordinator_key)
    assert not result.ok and {"merkle", "history"} <= {p.check for p in result.problems}


@pytest.mark.parametrize(("change", "first_seq", "message"), [
    pytest.param(lambda r: [*r[:4], *r[5:]], 5, "seq 5 is missing", id="delete_a_record"),
    pytest.param(lambda r: [*r[:2], r[3], r[2], *r[4:]], 3, "out of order", id="reorder_two"),
    pytest.param(lambda r: r[:-2], 11, "seq 11..12 are missing", id="truncate_the_tail"),
])
def test_a_record_deleted_moved_or_cut_off(export_dir, coordinator_key, change, first_seq, message):
    _, records = _records(export_dir)
    _rewrite(export_dir, change(records))
    result = _verify(export_dir, coordinator_key)
    assert _first(result) == (first_seq, "sequence")
    assert message in result.first_problem.message


def test_edit_and_rechain_is_narrowed_down_by_the_logs_checkpoints(export_dir, coordinator_key):
    _, records = _records(export_dir)
    records[5]["context"]["epsilon"] = 0.1  # seq 6, between the checkpoints recorded at seq 4 and 8
    _rewrite(export_dir, _rechain(records))
    result = _verify(export_dir, coordinator_key)
    checks = {p.check: p for p in result.problems}
    assert "content" not in checks and "chain" not in checks  # the forger's chain holds
    assert "merkle" in checks
    assert "among seq 4..7" in checks["history"].message


def test_rebuild_the_whole_log_with_a_new_key(export_dir, coordinator_key, tmp_path):
    _, records = _records(export_dir)
    records[5]["outcome"] = "failure"
    _forge(records)
    forger = generate_signing_key()
    tree = MerkleTree.from_leaves(canonical_record(r) for r in records)
    forged_checkpoint = sign_checkpoint(forger, tree.size, tree.root())
    forged = tmp_path / "forged"
    write_export_bundle(forged, records=records, checkpoint=forged_checkpoint, signing_key=forger,
                        exported_at=datetime.now(UTC))
    # Against the export's own key it is a sound log; that is why the key must come from elsewhere.
    alone = verify_export(forged)
    assert alone.ok and alone.key_source == "export" and "WARNING" in alone.summary()
    result = _verify(forged, coordinator_key)
    assert {"key", "signature", "manifest"} <= {p.check for p in result.problems}
    assert "signed by someone else" in result.first_problem.message
    earlier = verify_export(forged, since_checkpoint=export_dir / "checkpoint.json")
    assert not earlier.ok and "re-signed with another key" in earlier.first_problem.message


@pytest.mark.parametrize("damage", ["public_key", "proofs", "manifest_sig", "checkpoint", "manifest"])
def test_every_file_is_covered(export_dir, coordinator_key, damage):
    if damage == "public_key":
        (export_dir / "public_key.pem").write_bytes(public_key_pem(generate_signing_key()))
    elif damage == "proofs":
        (export_dir / "proofs.json").write_text('{"tree_size": 12, "inclusion": {}, "consistency": {"1": []}}')
    elif damage == "manifest_sig":
        (export_dir / "manifest.sig").unlink()
    elif damage == "checkpoint":
        data = json.loads((export_dir / "checkpoint.json").read_bytes())
        (export_dir / "checkpoint.json").write_text(json.dumps({**data, "tree_size": 11}))
    else:
        data = json.loads((export_dir / "manifest.json").read_bytes())
        (export_dir / "manifest.json").write_text(json.dumps({**data, "complete": False}))
    result = _verify(export_dir, coordinator_key)
    assert not result.ok
    assert result.problems[0].check in {"manifest", "key"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_filtered_export_proves_each_record(log, coordinator_key, tmp_path, fmt):
    earlier = _export(log, coordinator_key, tmp_path / "all")  # checkpoint of 12; seq 13 announces it
    with log.begin() as s:
        append_audit_event(s, action="job.started", actor_type="coordinator", actor_id="round-engine",
                           resource_type="job", resource_id="job-2", outcome="success", context={})
    out = tmp_path / "job-2"
    result = _export(log, coordinator_key, out, record_format=fmt, job_id="job-2",
                     since=T0 + timedelta(minutes=30))
    assert not result.complete
    _, records = _records(out)
    assert [r["seq"] for r in records] == [7, 11, 14]  # job-2's records from 09:30 on
    manifest = json.loads((out / "manifest.json").read_bytes())
    assert manifest["filter"] == {"job_id": "job-2", "from": "2026-05-01T09:30:00.000000Z", "to": None}
    verified = _verify(out, coordinator_key, since_checkpoint=tmp_path / "all")
    assert verified.ok, verified.summary()
    assert (verified.records, verified.tree_size, verified.since_tree_size) == (3, 14, earlier.checkpoint.tree_size)

    # A checkpoint the coordinator never stored has no consistency proof in the export.
    tree = MerkleTree.from_leaves(canonical_record(r) for r in _records(tmp_path / "all")[1][:5])
    unknown = sign_checkpoint(coordinator_key, 5, tree.root())
    assert "no consistency proof from size 5" in _verify(out, coordinator_key, since_checkpoint=unknown).summary()

    original = copy.deepcopy(records)
    records[1]["outcome"] = "failure"
    _rewrite(out, records)
    assert _first(_verify(out, coordinator_key)) == (11, "content")
    _rewrite(out, original)
    proofs = json.loads((out / "proofs.json").read_bytes())
    del proofs["inclusion"]["14"]
    (out / "proofs.json").write_text(json.dumps(proofs))
    assert _first(_verify(out, coordinator_key)) == (14, "merkle")


def test_database_tampering_is_caught(log, coordinator_key, tamperer, tmp_path):
    first = tmp_path / "first"
    _export(log, coordinator_key, first)  # signs a checkpoint of 12 records; the auditor keeps it
    tamperer.drop_triggers()
    tamperer.execute("UPDATE audit_events SET outcome = 'failure' WHERE seq = 6")
    with pytest.raises(AuditIntegrityError, match=r"seq 6 \[content\]"):  # naive: the next export refuses
        _export(log, coordinator_key, tmp_path / "refused")
    tamperer.rechain()
    with pytest.raises(AuditIntegrityError, match="among seq 4..7"):  # the log's checkpoint records disagree
        _export(log, coordinator_key, tmp_path / "refused")
    tamperer.restate_checkpoint_records()
    with pytest.raises(AuditIntegrityError, match="no longer have the Merkle root signed in checkpoint"):
        _export(log, coordinator_key, tmp_path / "refused")
    tamperer.execute("DELETE FROM audit_checkpoints")  # thorough: nothing left in the database to compare with
    later = tmp_path / "later"
    _export(log, coordinator_key, later)
    # Signed by the real key over the rewritten log: sound on its own...
    assert _verify(later, coordinator_key).ok
    # ...but not an extension of what the auditor saw before.
    result = _verify(later, coordinator_key, since_checkpoint=first / "checkpoint.json")
    assert not result.ok and result.first_problem.check == "consistency"
    assert "records 1..12 were changed since" in result.first_problem.message
    named = _verify(later, coordinator_key, since_checkpoint=first)  # the earlier export itself names the record
    assert _first(named) == (6, "consistency")


def test_a_log_the_round_engine_wrote_exports_and_verifies(job_context, honest_agents, tmp_path):
    run_job(job_context, "job-1", honest_agents)
    with job_context.sessions() as s:
        first_checkpoint = Checkpoint.from_dict(_checkpoints(s)[0])
    out = tmp_path / "export"
    _export(job_context.sessions, job_context.signing_key, out, record_format="csv")
    result = _verify(out, job_context.signing_key, since_checkpoint=first_checkpoint)
    assert result.ok, result.summary()
    assert result.since_tree_size == first_checkpoint.tree_size < result.tree_size


def _checkpoints(session):
    from sqlalchemy import select

    from fedtune.coordinator.store import AuditCheckpoint
    from fedtune.coordinator.store.audit import checkpoint_of

    return [checkpoint_of(c).to_dict() for c in session.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.id))]
