"""The SQL store on SQLite and PostgreSQL: migrations match the ORM, constraints hold, the audit
tables are append-only, audit seq is gapless."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from fedtune.coordinator.migrations import alembic_config, upgrade_database
from fedtune.coordinator.store import (
    AdapterVersion,
    AuditCheckpoint,
    AuditEvent,
    Base,
    Client,
    Job,
    PrivacyLedgerEntry,
    Round,
    Update,
    append_audit_event,
)
from fedtune.coordinator.store.models import RetiredFlowerNode

TABLES = {"clients", "api_tokens", "jobs", "rounds", "updates", "adapter_versions", "privacy_ledger",
          "audit_events", "audit_checkpoints", "retired_flower_nodes", "job_suspensions"}


def _seed(session) -> Round:
    session.add(Client(id="bank-a", org="Bank A", name="agent 1", public_key="ed25519:AAAA"))
    job = Job(id="job-1", base_digest="sha256:base", config={"rounds": 2, "lora": {"r": 8}})
    rnd = Round(job=job, number=1, nonce=b"\x01" * 32, status="running")
    session.add_all([job, rnd])
    session.flush()
    return rnd


def test_migration_creates_exactly_the_orm_schema(engine):
    assert set(inspect(engine).get_table_names()) == TABLES | {"alembic_version"}
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_upgrade_is_idempotent(engine):
    upgrade_database(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0004"


def _seed_client_job_round(conn, *, round_id: int, number: int, status: str) -> None:
    """bank-a, job-1 and one of its rounds, in plain SQL (any schema version from 0001 on)."""
    conn.execute(text("INSERT INTO clients (id, org, name, public_key, status, created_at) "
                      "VALUES ('bank-a', 'o', 'n', 'ed25519:AAAA', 'active', CURRENT_TIMESTAMP)"))
    conn.execute(text("INSERT INTO jobs (id, base_digest, config, status, created_at) "
                      "VALUES ('job-1', 'sha256:b', '{}', 'created', CURRENT_TIMESTAMP)"))
    conn.execute(text("INSERT INTO rounds (id, job_id, number, status, nonce) VALUES (:id, 'job-1', :number, "
                      ":status, :nonce)"), {"id": round_id, "number": number, "status": status, "nonce": b"\x01" * 32})


def _downgrade(engine, revision: str) -> None:
    """Alembic's downgrade of the store to ``revision``, on one connection of ``engine``."""
    with engine.begin() as conn:
        config = alembic_config()
        config.attributes["connection"] = conn
        command.downgrade(config, revision)


def test_0003_keeps_old_ledger_rows_as_committed_attempts_and_downgrades(database_url):
    """A ledger row written at 0002 (no nonce, no mechanism) becomes a committed row of its round's
    number; two attempts of one client in one round fit after the upgrade, not before the downgrade."""
    from fedtune.coordinator.store import create_store_engine

    engine = create_store_engine(database_url)
    try:
        upgrade_database(engine, "0002")
        with engine.begin() as conn:
            _seed_client_job_round(conn, round_id=7, number=3, status='completed')
            conn.execute(text("INSERT INTO privacy_ledger (kind, client_id, job_id, round_id, epsilon, delta, "
                              "created_at) VALUES ('record_level', 'bank-a', 'job-1', 7, 0.5, 1e-5, "
                              "CURRENT_TIMESTAMP)"))
        upgrade_database(engine)
        with engine.begin() as conn:
            assert conn.execute(text("SELECT status, round_number, nonce, sample_rate FROM privacy_ledger")).all() == [
                ("committed", 3, None, None)]
            conn.execute(text("INSERT INTO privacy_ledger (kind, client_id, job_id, round_id, epsilon, delta, "
                              "status, round_number, nonce, created_at) VALUES ('record_level', 'bank-a', 'job-1', "
                              "7, 0.4, 1e-5, 'reported', 2, 'ab', CURRENT_TIMESTAMP)"))
        _downgrade(engine, "0002")  # drops the reported row: 0002 allows one row per round
        with engine.connect() as conn:
            assert conn.execute(text("SELECT epsilon FROM privacy_ledger")).scalars().all() == [0.5]
    finally:
        engine.dispose()


def test_0002_keeps_existing_clients_and_downgrades(database_url):
    """A store created at 0001 with a client upgrades to 0002 (node key columns NULL) and back."""
    from fedtune.coordinator.store import create_store_engine

    engine = create_store_engine(database_url)
    try:
        upgrade_database(engine, "0001")
        with engine.begin() as conn:
            _seed_client_job_round(conn, round_id=1, number=1, status='running')
            # a row that references the client: dropping the columns again must not copy the table
            conn.execute(text("INSERT INTO updates (round_id, client_id, status, reason_code, received_at) "
                              "VALUES (1, 'bank-a', 'refused', 'budget', CURRENT_TIMESTAMP)"))
        upgrade_database(engine)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT id, node_public_key, flower_node_id FROM clients")).all() == [
                ("bank-a", None, None)]
        _downgrade(engine, "0001")
        assert "retired_flower_nodes" not in inspect(engine).get_table_names()
        assert {c["name"] for c in inspect(engine).get_columns("clients")} == {
            "id", "org", "name", "public_key", "status", "created_at", "revoked_at"}
    finally:
        engine.dispose()


def test_flower_node_ids_use_all_64_bits_and_node_keys_are_unique(sessions):
    """Flower node ids are unsigned 64-bit (half of them above BIGINT's maximum); NULL keys may repeat."""
    big, small = 2**64 - 5, 7
    with sessions.begin() as s:
        s.add_all([Client(id="a", org="o", name="n", public_key="k1", node_public_key="ecdsa-sha2-nistp384 A",
                          flower_node_id=big),
                   Client(id="b", org="o", name="n", public_key="k2", flower_node_id=small),
                   Client(id="c", org="o", name="n", public_key="k3")])
        s.add(RetiredFlowerNode(flower_node_id=2**63, client_id="a", node_public_key="ecdsa-sha2-nistp384 Z",
                                reason="rotated"))
    with sessions() as s:
        assert s.get(Client, "a").flower_node_id == big and s.get(Client, "b").flower_node_id == small
        assert s.scalars(select(Client.id).where(Client.flower_node_id == big)).all() == ["a"]
        assert s.get(RetiredFlowerNode, 2**63).client_id == "a"
    with pytest.raises(IntegrityError), sessions.begin() as s:
        s.add(Client(id="d", org="o", name="n", public_key="k4", node_public_key="ecdsa-sha2-nistp384 A"))
    with pytest.raises(IntegrityError), sessions.begin() as s:
        s.add(RetiredFlowerNode(flower_node_id=1, client_id="a", node_public_key="x", reason="lost"))


def test_sqlite_connections_use_wal_full_sync_and_foreign_keys(engine):
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite pragmas")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_rows_round_trip_with_utc_times_and_json(sessions):
    with sessions.begin() as s:
        rnd = _seed(s)
        rnd.started_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    with sessions() as s:
        job = s.get(Job, "job-1")
        assert job.config == {"rounds": 2, "lora": {"r": 8}}
        assert job.created_at.tzinfo is not None
        started = job.rounds[0].started_at
        assert started == datetime(2026, 1, 2, 1, 4, 5, tzinfo=UTC)
        assert started.utcoffset() == timedelta(0)
        assert job.rounds[0].nonce == b"\x01" * 32


def test_naive_datetimes_are_refused(sessions):
    with pytest.raises(Exception, match="naive datetime"), sessions.begin() as s:
        _seed(s).started_at = datetime(2026, 1, 1)


def test_foreign_keys_are_enforced(sessions):
    with pytest.raises(IntegrityError), sessions.begin() as s:
        s.add(Round(job_id="no-such-job", number=1, nonce=b"\x00" * 32))


def test_check_constraints_reject_unknown_statuses(sessions):
    with pytest.raises(IntegrityError), sessions.begin() as s:
        s.add(Client(id="c", org="o", name="n", public_key="k", status="suspended"))


def test_at_most_one_accepted_update_per_client_per_round(sessions):
    with sessions.begin() as s:
        rnd = _seed(s)
        s.add(Update(round_id=rnd.id, client_id="bank-a", status="accepted", digest="sha256:1"))
        # A second reply of the same client may be recorded as rejected...
        s.add(Update(round_id=rnd.id, client_id="bank-a", status="rejected", reason_code="duplicate"))
    with pytest.raises(IntegrityError), sessions.begin() as s:  # ...but never accepted twice
        s.add(Update(round_id=rnd.id, client_id="bank-a", status="accepted", digest="sha256:2"))


def test_rejected_update_needs_a_reason(sessions):
    with pytest.raises(IntegrityError), sessions.begin() as s:
        rnd = _seed(s)
        s.add(Update(round_id=rnd.id, client_id="bank-a", status="rejected"))


def test_one_adapter_version_per_round_and_per_number(sessions):
    with sessions.begin() as s:
        rnd = _seed(s)
        v0 = AdapterVersion(job_id="job-1", version=0, blob_path="v0", digest="sha256:0", size_bytes=1,
                            contributors=[], metrics={})
        s.add(v0)
        s.flush()
        s.add(AdapterVersion(job_id="job-1", version=1, round_id=rnd.id, parent_id=v0.id, blob_path="v1",
                             digest="sha256:1", size_bytes=1, contributors=[{"client_id": "bank-a"}], metrics={}))
    with pytest.raises(IntegrityError), sessions.begin() as s:
        s.add(AdapterVersion(job_id="job-1", version=2, round_id=rnd.id, blob_path="v2", digest="sha256:2",
                             size_bytes=1, contributors=[], metrics={}))
    with sessions() as s:
        v1 = s.scalars(select(AdapterVersion).where(AdapterVersion.version == 1)).one()
        assert v1.parent.version == 0 and v1.promoted is False


def test_ledger_rows_record_and_client_level(sessions):
    with sessions.begin() as s:
        rnd = _seed(s)
        s.add(PrivacyLedgerEntry(client_id="bank-a", job_id="job-1", round_id=rnd.id, epsilon=1.5, delta=1e-6,
                                 sample_rate=0.01, noise_multiplier=1.1, steps=100, accountant="rdp", nonce="aa"))
        s.add(PrivacyLedgerEntry(kind="client_level", job_id="job-1", round_id=rnd.id, epsilon=0.3, delta=1e-5,
                                 sample_rate=0.5, noise_multiplier=1.0, steps=1, accountant="rdp"))
        # an earlier attempt the client reports in this round: another nonce, same round row
        s.add(PrivacyLedgerEntry(client_id="bank-a", job_id="job-1", round_id=rnd.id, epsilon=1.5, delta=1e-6,
                                 sample_rate=0.01, noise_multiplier=1.1, steps=100, accountant="rdp", nonce="bb",
                                 status="reported", round_number=0))
    with pytest.raises(IntegrityError), sessions.begin() as s:  # record-level rows name their client
        s.add(PrivacyLedgerEntry(job_id="job-1", round_id=rnd.id, epsilon=1.0, delta=1e-6))
    with pytest.raises(IntegrityError), sessions.begin() as s:  # one record-level row per attempt (nonce)
        s.add(PrivacyLedgerEntry(client_id="bank-a", job_id="job-1", round_id=rnd.id, epsilon=1.0, delta=1e-6,
                                 nonce="aa"))


def _audit(session, action="round.completed", **kw):
    return append_audit_event(session, action=action, actor_type="system", actor_id="coordinator",
                              resource_type="round", resource_id="job-1/1", outcome="success", **kw)


def test_audit_seq_is_gapless_across_rollbacks(sessions):
    with sessions.begin() as s:
        assert _audit(s).seq == 1
    with pytest.raises(RuntimeError), sessions.begin() as s:
        assert _audit(s).seq == 2
        raise RuntimeError("the round's transaction fails")
    with sessions.begin() as s:
        event = _audit(s, context={"job": "job-1", "epsilon": 1.5}, reason_code=None)
        assert event.seq == 2
    with sessions() as s:
        events = s.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all()
        assert [e.seq for e in events] == [1, 2]
        assert events[1].context == {"job": "job-1", "epsilon": 1.5}
        assert events[1].occurred_at.tzinfo is not None and len(events[1].event_id) == 36


@pytest.mark.parametrize("statement", [
    "UPDATE audit_events SET outcome = 'failure'",
    "DELETE FROM audit_events",
    "UPDATE audit_checkpoints SET root_hash = 'x'",
    "DELETE FROM audit_checkpoints",
    "TRUNCATE audit_events",
    "TRUNCATE audit_checkpoints",
])
def test_audit_tables_are_append_only(sessions, engine, statement):
    if statement.startswith("TRUNCATE") and engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no TRUNCATE")
    with sessions.begin() as s:
        _audit(s)
        s.add(AuditCheckpoint(tree_size=1, root_hash="r", signed_at=datetime.now(UTC), key_id="k", signature="s"))
    with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
        conn.exec_driver_sql(statement)
    with sessions() as s:
        assert s.scalars(select(AuditEvent.outcome)).all() == ["success"]
        assert s.scalars(select(AuditCheckpoint.root_hash)).all() == ["r"]


def test_audit_updates_through_the_orm_are_refused(sessions):
    with sessions.begin() as s:
        _audit(s)
    with pytest.raises(DBAPIError, match="append-only"), sessions.begin() as s:
        s.scalars(select(AuditEvent)).one().outcome = "failure"


def test_immediate_sessions_take_the_sqlite_write_lock_at_begin(engine):
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite locking")
    import sqlite3

    from fedtune.coordinator.store import create_session_factory

    other = sqlite3.connect(engine.url.database, timeout=0.05, isolation_level=None)
    try:
        with create_session_factory(engine, immediate=True).begin() as s:
            s.execute(select(Job)).all()  # only a read so far, yet the write lock is held
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("INSERT INTO jobs (id, base_digest, config, status, created_at) "
                              "VALUES ('x', 'd', '{}', 'created', '2026-01-01')")
        with create_session_factory(engine).begin() as s:
            s.execute(select(Job)).all()
            other.execute("INSERT INTO jobs (id, base_digest, config, status, created_at) "
                          "VALUES ('y', 'd', '{}', 'created', '2026-01-01')")
    finally:
        other.close()
