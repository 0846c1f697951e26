"""Engines and sessions for the coordinator's store.

SQLite (the embedded default) gets, on every connection: WAL journal, ``synchronous=FULL`` (a
commit is on disk before it returns: the audit trail and round writes survive power loss),
foreign keys on, a busy timeout, and real transactions: pysqlite's own implicit BEGIN handling
is switched off and SQLAlchemy emits ``BEGIN`` itself, so a transaction covers its reads,
DDL and SAVEPOINTs. PostgreSQL is used as it comes (``postgresql+psycopg://...``).

Transactions that read and then write take SQLite's write lock when they begin (``immediate``);
transactions that only read begin deferred (:func:`read_session_factory`): in WAL mode they read
one snapshot and neither wait for a writer nor hold one up.

A SQLite store's files (the database, its ``-wal`` and ``-shm``) are the owner's only (0600): the
database file is created so before SQLite opens it, and SQLite gives its ``-wal`` and ``-shm`` the
database file's mode; an existing file open to group or others is narrowed, with a warning.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000


def create_store_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` with fedtune's connection settings (see the module docstring).

    Args:
        url: ``sqlite:///path/to/coordinator.db`` or ``postgresql+psycopg://user@host:port/db``.
        kwargs: passed to :func:`sqlalchemy.create_engine`.

    Raises:
        ValueError: a backend other than SQLite or PostgreSQL.
    """
    backend = make_url(url).get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ValueError(f"database URL {make_url(url).render_as_string(hide_password=True)!r}: fedtune's store "
                         f"runs on sqlite or postgresql, not {backend}")
    if backend == "sqlite":
        _private_sqlite_files(make_url(url).database)
    engine = create_engine(url, **kwargs)
    if backend == "sqlite":
        _configure_sqlite(engine)
    return engine


SQLITE_FILE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def _private_sqlite_files(database: str | None) -> None:
    """Create the database file with mode 0600 if it does not exist yet, and narrow the store's existing
    files (database, ``-wal``, ``-shm``, ``-journal``) to 0600 (they hold the audit trail and every
    client's keys and spend). In-memory and ``file:`` URI databases are left alone."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except FileNotFoundError:  # no such directory: SQLite says so when it connects
        return
    for name in (f"{path}{suffix}" for suffix in SQLITE_FILE_SUFFIXES):
        try:
            mode = stat.S_IMODE(os.stat(name).st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            try:
                os.chmod(name, 0o600)
            except PermissionError:  # another user's file: say so, SQLite decides whether it can be used
                log.warning("store file %s has mode %o (open to group or others) and is not ours to narrow; "
                            "run: chmod 600 %s", name, mode, name)
                continue
            log.warning("store file %s had mode %o (open to group or others); set it to 0600", name, mode)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # no implicit BEGIN/COMMIT from pysqlite
        cursor = dbapi_connection.cursor()
        try:
            mode = cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":  # in-memory databases stay "memory"
                log.info("SQLite journal mode is %s, not WAL (in-memory database?)", mode)
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(_BEGIN_IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


_BEGIN_IMMEDIATE = "fedtune_sqlite_begin_immediate"


def create_session_factory(engine: Engine, *, immediate: bool = False) -> sessionmaker[Session]:
    """Sessions on ``engine``; use ``with factory.begin() as session:`` for one transaction.

    Args:
        engine: from :func:`create_store_engine`.
        immediate: on SQLite, take the write lock when the transaction begins (``BEGIN
            IMMEDIATE``). Use it for transactions that read and then write (a round's commit):
            a deferred transaction that reads first can fail with "database is locked" when
            another writer committed in between, instead of waiting its turn. No effect on
            PostgreSQL.
    """
    bind = engine.execution_options(**{_BEGIN_IMMEDIATE: True}) if immediate else engine
    return sessionmaker(bind, expire_on_commit=False)


def read_session_factory(sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    """Sessions on the same store as ``sessions`` whose transactions begin deferred (plain ``BEGIN``), even
    when ``sessions`` begins ``IMMEDIATE``: for transactions that only read. On SQLite (WAL) such a
    transaction reads one consistent snapshot without waiting for, or holding up, a writer; it must not
    write (a deferred transaction that reads and then writes can fail with "database is locked").
    No effect on PostgreSQL.

    Args:
        sessions: from :func:`create_session_factory`.
    """
    bind = sessions.kw["bind"].execution_options(**{_BEGIN_IMMEDIATE: False})
    return sessionmaker(class_=sessions.class_, **{**sessions.kw, "bind": bind})
