"""Fixtures shared across the test tree.

``database_url``: every store test runs on SQLite (a temporary file) and, when
``FEDTUNE_TEST_DATABASE_URL`` is set (e.g. ``postgresql+psycopg://postgres@127.0.0.1:5432/test``),
on PostgreSQL too, each test in a fresh schema dropped afterwards. A set but unreachable server
fails the test: CI sets the variable, and a silently skipped PostgreSQL run would hide that.
"""

from __future__ import annotations

import os
import sys
import uuid

import pytest

PG_ENV = "FEDTUNE_TEST_DATABASE_URL"


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """torch in the test process runs on one thread. The suite's tensors are tiny, and its tests run beside
    processes of their own (agents, coordinators) or anyone's on two cores: with two threads, OpenMP's
    spin-waiting for a descheduled thread made a 30-step LoRA run on the tiny base 30x slower (52 s instead of
    1.6 s); one thread costs ~7% on an idle machine. Processes the tests start choose their own threads."""
    torch = sys.modules.get("torch")  # collection imported it if any test needs it; nothing to import otherwise
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """A database URL for an empty database (not yet migrated)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'coordinator.db'}"
        return
    base_url = os.environ.get(PG_ENV)
    if not base_url:
        pytest.skip(f"{PG_ENV} not set: PostgreSQL store tests skipped")
    yield from _postgres_schema_url(base_url)


def _postgres_schema_url(base_url: str):
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    schema = f"fedtune_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base_url)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as e:
        admin.dispose()
        pytest.fail(f"{PG_ENV}={base_url} is set but the PostgreSQL server is not reachable: {e}")
    url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def store_engine(database_url):
    """An engine on a freshly migrated store (SQLite and, when configured, PostgreSQL)."""
    from fedtune.coordinator.migrations import upgrade_database
    from fedtune.coordinator.store import create_store_engine

    engine = create_store_engine(database_url)
    upgrade_database(engine)
    yield engine
    engine.dispose()
