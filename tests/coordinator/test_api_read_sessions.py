"""Reads do not take the store's write lock (security review finding 8): the token lookup and a GET's
queries run in a deferred transaction while an outside writer holds the lock; only the request's own
audit record, a one-row append, waits for it, and the response leaves once that record committed
(no read is served unaudited). On SQLite the outside writer is another connection in ``BEGIN
IMMEDIATE``; on PostgreSQL, a transaction holding the audit append lock every writer of the trail takes.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import make_url

from fedtune.coordinator.api import ApiSettings, create_app
from fedtune.coordinator.api.auth import create_token
from fedtune.coordinator.encryption import generate_blob_key
from fedtune.coordinator.rounds import CoordinatorContext
from fedtune.coordinator.store import AuditEvent, create_session_factory
from fedtune.coordinator.store.audit import lock_audit_log
from fedtune.coordinator.store.engine import read_session_factory

HOLD_S = 1.5


@pytest.fixture
def immediate_api(engine, tmp_path):
    """The admin API on a write factory that begins IMMEDIATE, as ``fedtune coordinator serve`` builds it."""
    sessions = create_session_factory(engine, immediate=True)
    ctx = CoordinatorContext(sessions=sessions, blob_dir=tmp_path / "blobs", blob_key=generate_blob_key())
    with sessions.begin() as s:
        token = create_token(s, name="ops", role="operator")[1]
    client = TestClient(create_app(ApiSettings(ctx=ctx)))
    client.headers["Authorization"] = f"Bearer {token}"
    return client


class OutsideWriter:
    """Holds the store's write lock from outside the API until :meth:`release`."""

    def __init__(self, engine) -> None:
        self.engine = engine
        if engine.dialect.name == "sqlite":
            self.conn = sqlite3.connect(make_url(engine.url).database, isolation_level=None)
            self.conn.execute("BEGIN IMMEDIATE")
        else:
            self.session = create_session_factory(engine)()
            self.session.begin()
            lock_audit_log(self.session)

    def release(self) -> None:
        if self.engine.dialect.name == "sqlite":
            self.conn.execute("COMMIT")
            self.conn.close()
        else:
            self.session.commit()
            self.session.close()


def test_a_get_reads_while_a_writer_holds_the_lock_and_is_audited_after_it(immediate_api, engine):
    statements: list[tuple[float, str]] = []

    @event.listens_for(engine, "after_cursor_execute")
    def _seen(conn, cursor, statement, *args) -> None:
        statements.append((time.monotonic(), statement))

    writer = OutsideWriter(engine)
    started = time.monotonic()
    result: dict = {}

    def get() -> None:
        result["response"] = immediate_api.get("/api/v1/clients", headers={"X-Request-ID": "read-under-lock"})
        result["done"] = time.monotonic()

    thread = threading.Thread(target=get)
    thread.start()
    time.sleep(HOLD_S)
    assert thread.is_alive(), "the GET finished while the writer held the lock: its audit record was not written"
    released = time.monotonic()
    writer.release()
    thread.join(30)
    event.remove(engine, "after_cursor_execute", _seen)

    # the token lookup and the page's queries ran at once, while the writer held the lock
    reads = [(t, sql) for t, sql in statements if "FROM api_tokens" in sql or "FROM clients" in sql]
    assert any("FROM api_tokens" in sql for _, sql in reads) and any("FROM clients" in sql for _, sql in reads)
    assert all(t - started < 1.0 for t, _ in reads), [(round(t - started, 2), sql[:60]) for t, sql in reads]
    # the response waited only for its one audit append, and left right after the writer let go
    assert result["response"].status_code == 200, result["response"].text
    assert 0 <= result["done"] - released < 1.0
    with create_session_factory(engine)() as s:
        row = s.execute(select(AuditEvent).where(AuditEvent.request_id == "read-under-lock")).scalar_one()
    assert (row.action, row.outcome) == ("client.list", "success")


def test_with_no_writer_a_get_answers_at_once(immediate_api):
    started = time.monotonic()
    assert immediate_api.get("/api/v1/clients").status_code == 200
    assert time.monotonic() - started < 1.0


def test_read_sessions_begin_deferred_write_sessions_immediate(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    from fedtune.coordinator.store.engine import _configure_sqlite

    _configure_sqlite(engine)
    begins: list[str] = []
    event.listen(engine, "after_cursor_execute",
                 lambda conn, cursor, sql, *a: begins.append(sql) if sql.startswith("BEGIN") else None)
    writes = create_session_factory(engine, immediate=True)
    reads = read_session_factory(writes)
    with writes.begin() as s:
        s.execute(select(1))
    with reads() as s:
        s.execute(select(1))
    with read_session_factory(create_session_factory(engine)).begin() as s:
        s.execute(select(1))
    assert begins == ["BEGIN IMMEDIATE", "BEGIN", "BEGIN"]
    assert reads.kw["expire_on_commit"] is False
    engine.dispose()


def test_an_export_reads_the_trail_without_holding_the_append_lock(engine, tmp_path, monkeypatch):
    """While an audit export reads (and checks) the whole trail, another writer can take the lock and
    append: the export holds it only to confirm the trail it read and sign its checkpoint."""
    from fedtune.compliance.signing import generate_signing_key
    from fedtune.coordinator.store import audit

    sessions = create_session_factory(engine, immediate=True)
    ctx = CoordinatorContext(sessions=sessions, blob_dir=tmp_path / "blobs", blob_key=generate_blob_key())
    with sessions.begin() as s:
        token = create_token(s, name="aud", role="auditor")[1]
    api = TestClient(create_app(ApiSettings(ctx=ctx, signing_key=generate_signing_key())))
    api.headers["Authorization"] = f"Bearer {token}"
    real_read, waited = audit.read_audit_log, []

    def read_while_another_writer_writes(session):
        started = time.monotonic()
        writer = OutsideWriter(engine)  # blocks (up to the busy timeout) if the export held the lock
        writer.release()
        waited.append(time.monotonic() - started)
        return real_read(session)

    monkeypatch.setattr(audit, "read_audit_log", read_while_another_writer_writes)
    r = api.post("/api/v1/audit/export", json={"format": "jsonl"})
    assert r.status_code == 200, r.text
    assert waited and waited[0] < 1.0
