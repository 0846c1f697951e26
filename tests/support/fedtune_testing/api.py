"""Helpers for the admin-API tests (the fixtures are in tests/coordinator/conftest.py)."""

from __future__ import annotations

from fedtune.compliance.signing import encode_public_key, generate_signing_key

ROLES = ("admin", "operator", "auditor")

# The expected authorization of every endpoint, written from the role model (not from
# the code's table): "O" operator, "A" auditor; admin may do everything.
#   (method, path, roles besides admin)
MATRIX = [
    ("POST", "/api/v1/clients", "O"),
    ("GET", "/api/v1/clients", "OA"),
    ("GET", "/api/v1/clients/{client_id}", "OA"),
    ("POST", "/api/v1/clients/{client_id}/revoke", "O"),
    ("POST", "/api/v1/clients/{client_id}/keys", "O"),
    ("POST", "/api/v1/jobs", "O"),
    ("GET", "/api/v1/jobs", "OA"),
    ("GET", "/api/v1/jobs/{job_id}", "OA"),
    ("POST", "/api/v1/jobs/{job_id}/start", "O"),
    ("POST", "/api/v1/jobs/{job_id}/pause", "O"),
    ("POST", "/api/v1/jobs/{job_id}/resume", "O"),
    ("POST", "/api/v1/jobs/{job_id}/abort", "O"),
    ("GET", "/api/v1/jobs/{job_id}/rounds", "OA"),
    ("GET", "/api/v1/jobs/{job_id}/suspensions", "OA"),
    ("POST", "/api/v1/jobs/{job_id}/suspensions/{client_id}/lift", "O"),
    ("GET", "/api/v1/jobs/{job_id}/adapters", "OA"),
    ("GET", "/api/v1/jobs/{job_id}/adapters/{version}", "OA"),
    ("GET", "/api/v1/jobs/{job_id}/adapters/{version}/lineage", "OA"),
    ("GET", "/api/v1/jobs/{job_id}/adapters/{version}/download", "O"),
    ("POST", "/api/v1/jobs/{job_id}/adapters/{version}/promote", "O"),
    ("POST", "/api/v1/jobs/{job_id}/adapters/rollback", "O"),
    ("GET", "/api/v1/clients/{client_id}/privacy/ledger", "OA"),
    ("GET", "/api/v1/clients/{client_id}/privacy/budget", "OA"),
    ("GET", "/api/v1/audit/events", "A"),
    ("GET", "/api/v1/audit/checkpoints", "A"),
    ("POST", "/api/v1/audit/export", "A"),
    ("POST", "/api/v1/audit/verify", "A"),
    ("GET", "/api/v1/jobs/{job_id}/processing-record", "A"),
    ("GET", "/api/v1/metrics", "O"),
]


def auth(api, who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api.tokens[who]}"}


def register(api, client_id: str, key=None) -> dict:
    key = key or generate_signing_key()
    r = api.post("/api/v1/clients", headers=auth(api, "operator"),
                 json={"id": client_id, "org": f"org-{client_id}", "name": client_id,
                       "public_key": encode_public_key(key)})
    assert r.status_code == 201, r.text
    return r.json()
