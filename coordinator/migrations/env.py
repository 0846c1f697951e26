"""Alembic environment: runs on the connection handed over by ``upgrade_database`` (or, for the
``alembic`` command line, on ``sqlalchemy.url`` / ``FEDTUNE_DATABASE_URL``)."""

from __future__ import annotations

from alembic import context

from fedtune.coordinator.settings import CoordinatorSettings
from fedtune.coordinator.store.engine import create_store_engine
from fedtune.coordinator.store.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite ALTERs go through table copies
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url") or CoordinatorSettings().database_url
    if not url:
        raise ValueError(f"no database: set {CoordinatorSettings.env_name('database_url')} or pass a connection to "
                         "upgrade_database")
    engine = create_store_engine(url)
    try:
        with engine.begin() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported; use upgrade_database(url)")
run_migrations_online()
