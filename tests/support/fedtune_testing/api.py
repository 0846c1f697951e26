"""Helpers for the admin-API tests (the fixtures are in tests/coordinator/conftest.py)."""

from __future__ import annotations

from fedtune.compliance.signing import encode_public_key, generate_signing_key

ROLES = ("admin", "operator", "auditor")


def auth(api, who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api.tokens[who]}"}


def register(api, client_id: str, key=None) -> dict:
    key = key or generate_signing_key()
    r = api.post("/api/v1/clients", headers=auth(api, "operator"),
                 json={"id": client_id, "org": f"org-{client_id}", "name": client_id,
                       "public_key": encode_public_key(key)})
    assert r.status_code == 201, r.text
    return r.json()
