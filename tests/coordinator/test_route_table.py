"""Every route of the app has its entry in the one table of the API's actions, and nothing else decides.

The table is :data:`fedtune.compliance.actions.API_ROUTE_ACTIONS` (action -> description and roles); a
route's ``name=`` is its action. Checked here by walking ``app.routes``: every API route (under
``/api/v1``) has an entry with a description and roles; every entry has its route (no orphan); the
roles the API enforces are the entry's; and the entries agree with the hand-written matrix of
``fedtune_testing.api`` (the independent reference, which test_api.py also checks over HTTP). Routes
outside ``/api/v1`` are the console's (they audit their own ``console.*`` actions) or the unaudited
service paths; any other route fails here until it has a place.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from sqlalchemy import create_engine

from fedtune.compliance.actions import ACTIONS, API_ACTIONS, API_ROUTE_ACTIONS
from fedtune.coordinator.api import API_PREFIX, ApiSettings, create_app
from fedtune.coordinator.api.app import CONSOLE_PREFIX, UNAUDITED_PATHS
from fedtune.coordinator.api.auth import PERMISSIONS, allowed
from fedtune.coordinator.rounds import CoordinatorContext
from fedtune.coordinator.store import create_session_factory
from fedtune.coordinator.store.models import TOKEN_ROLES
from fedtune_testing.api import MATRIX, ROLES

CONSOLE_ACTIONS = ("console.sign_in", "console.sign_out", "console.session")


def _routes(routes) -> Iterator:
    """Every route of ``routes``, descending into included routers (FastAPI keeps them as one entry each)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _routes(inner.routes)
        else:
            yield route


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    # the app is only built and walked, never served: its store is never opened
    ctx = CoordinatorContext(sessions=create_session_factory(create_engine("sqlite://")),
                             blob_dir=Path(tmp_path_factory.mktemp("blobs")), blob_key=bytes(32))
    return create_app(ApiSettings(ctx=ctx))


@pytest.fixture(scope="module")
def api_routes(app) -> list[APIRoute]:
    return [r for r in _routes(app.routes) if r.path.startswith(API_PREFIX + "/")]


def test_every_route_of_the_app_has_a_place(app):
    homeless = []
    for route in _routes(app.routes):
        path = route.path
        if path.startswith(API_PREFIX + "/"):
            assert isinstance(route, APIRoute), path
        elif not (path in UNAUDITED_PATHS or path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/")):
            homeless.append(path)
    assert homeless == [], f"routes outside {API_PREFIX}, the console and the unaudited paths: {homeless}"


def test_every_api_route_has_an_entry_with_a_description_and_roles(api_routes):
    for route in api_routes:
        entry = API_ROUTE_ACTIONS.get(route.name)
        assert entry is not None, f"{route.path}: its name= {route.name!r} has no entry in API_ROUTE_ACTIONS"
        assert entry.description.strip(), route.name
        assert entry.roles, route.name
        assert entry.roles <= set(TOKEN_ROLES), (route.name, entry.roles)
        assert ACTIONS[route.name] == entry.description  # the audit vocabulary has it, as written there


def test_every_entry_has_exactly_one_route(api_routes):
    names = [r.name for r in api_routes]
    assert sorted(names) == sorted(set(names)), "two routes share an action"
    orphans = sorted(set(API_ROUTE_ACTIONS) - set(names))
    assert orphans == [], f"entries of API_ROUTE_ACTIONS without a route: {orphans}"


def test_the_api_enforces_exactly_the_tables_roles(api_routes):
    assert {name: entry.roles for name, entry in API_ROUTE_ACTIONS.items()} == PERMISSIONS
    for route in api_routes:
        for role in ROLES:
            assert allowed(route.name, role) == (role in API_ROUTE_ACTIONS[route.name].roles), (route.name, role)
        assert not allowed(route.name, None)
    for other in ("api.unknown", *API_ACTIONS):  # actions no token role may call as a route
        assert not any(allowed(other, role) for role in ROLES), other


def test_the_table_agrees_with_the_hand_written_matrix(api_routes):
    by_operation = {(method, re.sub(r"\{(\w+):\w+\}", r"{\1}", r.path)): r.name
                    for r in api_routes for method in r.methods}
    assert set(by_operation) == {(m, p) for m, p, _ in MATRIX}
    for method, path, letters in MATRIX:
        expected = {"admin"} | {role for role, letter in (("operator", "O"), ("auditor", "A")) if letter in letters}
        assert API_ROUTE_ACTIONS[by_operation[(method, path)]].roles == expected, (method, path)


def test_the_consoles_own_actions_are_in_the_vocabulary():
    # the console's routes are not authorized through the table: they write these actions themselves
    assert set(CONSOLE_ACTIONS) <= set(API_ACTIONS)
    assert not set(CONSOLE_ACTIONS) & set(API_ROUTE_ACTIONS)
