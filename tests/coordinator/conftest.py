from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.compliance.signing import generate_signing_key
from fedtune.coordinator.api import ApiSettings, create_app
from fedtune.coordinator.api.auth import create_token, revoke_token
from fedtune.coordinator.encryption import generate_blob_key
from fedtune.coordinator.jobs import BaseCatalog
from fedtune.coordinator.rounds import CoordinatorContext
from fedtune.coordinator.store import create_session_factory
from fedtune_testing.api import ROLES


@pytest.fixture
def engine(store_engine):
    """The migrated store of tests/conftest.py under the name the coordinator tests use."""
    return store_engine


@pytest.fixture
def sessions(engine):
    return create_session_factory(engine)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    from fedtune.model.cli import init_tiny

    path = tmp_path_factory.mktemp("base") / "tiny"
    init_tiny(path, preset="tiny", seed=0)
    return path


@pytest.fixture
def api(sessions, tmp_path, tiny_base):
    ctx = CoordinatorContext(sessions=sessions, blob_dir=tmp_path / "blobs", blob_key=generate_blob_key())
    catalog = BaseCatalog.from_paths([tiny_base])
    settings = ApiSettings(ctx=ctx, catalog=catalog, signing_key=generate_signing_key())
    tokens = {}
    with sessions.begin() as s:
        for role in ROLES:
            tokens[role] = create_token(s, name=f"{role}-token", role=role)[1]
        row, tokens["revoked"] = create_token(s, name="old", role="admin")
        revoke_token(s, row.id)
    from fastapi.testclient import TestClient

    client = TestClient(create_app(settings))
    client.tokens = tokens
    client.ctx = ctx
    client.base_digest = next(iter(catalog.paths))
    return client
