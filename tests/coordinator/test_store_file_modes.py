"""A SQLite store's files are the owner's only (security review finding 8: coordinator.db and its WAL
were 0644): the database, its -wal and -shm are 0600 whatever the umask, and an existing store open
to group or others is narrowed when an engine is created on it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from sqlalchemy import text

from fedtune.coordinator.migrations import upgrade_database
from fedtune.coordinator.store import create_session_factory, create_store_engine


def _modes(db: Path) -> dict[str, int]:
    return {suffix: stat.S_IMODE(os.stat(f"{db}{suffix}").st_mode) for suffix in ("", "-wal", "-shm")}


@pytest.fixture
def permissive_umask():
    old = os.umask(0o022)  # what made 0644 files
    yield
    os.umask(old)


def test_a_new_store_and_its_wal_are_0600(tmp_path, permissive_umask):
    db = tmp_path / "coordinator.db"
    engine = create_store_engine(f"sqlite:///{db}")
    upgrade_database(engine)
    with create_session_factory(engine, immediate=True).begin() as s:  # a write: the WAL has frames
        s.execute(text("CREATE TABLE scratch (x INTEGER)"))
        s.execute(text("INSERT INTO scratch VALUES (1)"))
    with engine.connect() as conn:  # an open connection keeps -wal and -shm on disk
        conn.exec_driver_sql("SELECT x FROM scratch").all()
        assert os.path.getsize(f"{db}-wal") > 0
        assert _modes(db) == {"": 0o600, "-wal": 0o600, "-shm": 0o600}
    engine.dispose()


def test_an_existing_open_store_is_narrowed(tmp_path, permissive_umask, caplog):
    db = tmp_path / "coordinator.db"
    engine = create_store_engine(f"sqlite:///{db}")
    upgrade_database(engine)
    engine.dispose()
    db.chmod(0o644)  # a store made before this fix
    engine = create_store_engine(f"sqlite:///{db}")
    assert "had mode 644" in caplog.text
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT count(*) FROM audit_events").all()
        assert _modes(db) == {"": 0o600, "-wal": 0o600, "-shm": 0o600}
    engine.dispose()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_stores_create_no_file(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    engine = create_store_engine(url)
    upgrade_database(engine)
    engine.dispose()
    assert not list(tmp_path.iterdir())
