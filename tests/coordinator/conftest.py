from __future__ import annotations

import pytest

from fedtune.coordinator.migrations import upgrade_database
from fedtune.coordinator.store import create_session_factory, create_store_engine


@pytest.fixture
def engine(database_url):
    """An engine on a freshly migrated database (SQLite and, when configured, PostgreSQL)."""
    engine = create_store_engine(database_url)
    upgrade_database(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine):
    return create_session_factory(engine)
