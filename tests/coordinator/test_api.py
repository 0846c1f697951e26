"""The admin API on SQLite and PostgreSQL: the authorization matrix (every endpoint x role, plus no,
bad and revoked tokens), audit of every request, bad input, job life cycle, adapters, privacy; and
the security review's findings: receipt keys checked as points, jobs with a norm bound unless
explicitly "none", robust aggregation that does something, time ranges the store can hold,
Markdown reports escaped, nosniff on every response."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import zipfile

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from safetensors.torch import load as load_safetensors
from sqlalchemy import select

from fedtune.compliance.signing import encode_public_key, generate_signing_key
from fedtune.compliance.wire import TrainInstruction, sign_train_reply
from fedtune.coordinator.rounds import JobPlan, registered_clients
from fedtune.coordinator.store import AdapterVersion, AuditEvent, Client, Job
from fedtune.coordinator.store.models import RetiredFlowerNode
from fedtune.coordinator.validation import Accepted, Rejected, RejectReason, RoundExpectation, validate_reply
from fedtune_testing.api import MATRIX, ROLES, auth, register
from fedtune_testing.tamper import DatabaseTamperer


def job_body(api, job_id="job-1", clients=("bank-a", "bank-b"), **over) -> dict:
    body = {"id": job_id, "base_digest": api.base_digest, "clients": list(clients), "rounds": 2,
            "min_clients": 2, "aggregation": {"method": "ffa"}, "norm_bound": 10.0,
            "lora": {"rank": 2, "ffa": True, "target_modules": ["q_a_proj", "o_proj"]},
            "privacy": {"target_epsilon": 4.0, "delta": 1e-5}, "max_client_epsilon": 10.0}
    body.update(over)
    return body


def audit_rows(api) -> list[AuditEvent]:
    with api.ctx.sessions() as s:
        return s.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars().all()


def test_the_matrix_covers_every_endpoint(api):
    served = {(m.upper(), path) for path, ops in api.app.openapi()["paths"].items() if path.startswith("/api/")
              for m in ops}
    assert served == {(m, p) for m, p, _ in MATRIX}


@pytest.mark.parametrize(("method", "path", "roles"), MATRIX, ids=[f"{m} {p}" for m, p, _ in MATRIX])
def test_authorization_matrix(api, method, path, roles):
    url = path.format(client_id="nobody", job_id="nojob", version=0)
    body = {"to_version": 0} if path.endswith("rollback") else {}
    allowed = {"admin"} | {r for r, letter in (("operator", "O"), ("auditor", "A")) if letter in roles}
    expected = []
    for who in (*ROLES, "none", "bad", "revoked"):
        headers = {} if who == "none" else (
            {"Authorization": "Bearer ftk_not-a-real-token"} if who == "bad" else auth(api, who))
        headers["X-Request-ID"] = f"matrix-{who}"
        r = api.request(method, url, headers=headers, json=body if method == "POST" else None)
        if who in ("none", "bad", "revoked"):
            assert r.status_code == 401, (who, r.status_code, r.text)
            expected.append((f"matrix-{who}", "denied"))
        elif who in allowed:
            assert r.status_code not in (401, 403), (who, r.status_code, r.text)
            assert r.status_code < 500, r.text
            expected.append((f"matrix-{who}", "success" if r.status_code < 400 else "failure"))
        else:
            assert r.status_code == 403, (who, r.status_code, r.text)
            assert who in r.json()["detail"]
            expected.append((f"matrix-{who}", "denied"))
    # every request, allowed or denied, left exactly one audit record with its request id
    rows = [e for e in audit_rows(api) if e.request_id and e.request_id.startswith("matrix-")]
    assert [(e.request_id, e.outcome) for e in rows] == expected
    assert all(e.context["path"] == url and e.context["method"] == method for e in rows)
    denied = {e.request_id: e for e in rows if e.outcome == "denied"}
    assert denied["matrix-none"].reason_code == "missing_token"
    assert denied["matrix-bad"].reason_code == "invalid_token"
    assert denied["matrix-revoked"].reason_code == "revoked_token"
    assert all(e.reason_code == "role_not_allowed" and e.actor_id.startswith("token:")
               for k, e in denied.items() if k not in ("matrix-none", "matrix-bad", "matrix-revoked"))


def test_healthz_needs_no_token_and_unknown_paths_are_denied_without_one(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/api/v1/nothing-here").status_code == 401
    assert api.get("/api/v1/nothing-here", headers=auth(api, "admin")).status_code == 404
    assert [e.action for e in audit_rows(api)][-2:] == ["api.unknown", "api.unknown"]


def test_register_list_revoke_client(api):
    key = generate_signing_key()
    out = register(api, "bank-a", key)
    assert out["status"] == "active" and out["public_key"] == encode_public_key(key)
    # the same id or the same key again: 409, nothing written
    dup = api.post("/api/v1/clients", headers=auth(api, "admin"),
                   json={"id": "bank-a", "org": "x", "name": "x", "public_key": encode_public_key(key)})
    assert dup.status_code == 409
    same_key = api.post("/api/v1/clients", headers=auth(api, "admin"),
                        json={"id": "bank-z", "org": "x", "name": "x", "public_key": encode_public_key(key)})
    assert same_key.status_code == 409 and "public_key" in same_key.json()["detail"]
    listed = api.get("/api/v1/clients", headers=auth(api, "auditor")).json()
    assert [c["id"] for c in listed["items"]] == ["bank-a"] and listed["total"] == 1
    r = api.post("/api/v1/clients/bank-a/revoke", headers=auth(api, "operator"))
    assert r.json()["status"] == "revoked" and r.json()["revoked_at"]
    rows = [e for e in audit_rows(api) if e.action in ("client.register", "client.revoke")]
    assert [(e.action, e.outcome) for e in rows] == [
        ("client.register", "success"), ("client.register", "failure"),
        ("client.register", "failure"), ("client.revoke", "success")]
    assert rows[0].resource_id == "bank-a" and rows[-1].resource_id == "bank-a"


@pytest.mark.parametrize(("body", "field"), [
    ({"id": "bank a", "org": "o", "name": "n"}, "id"),
    ({"id": "bank-a", "org": "", "name": "n"}, "org"),
    ({"id": "bank-a", "org": "o\x00", "name": "n"}, "org"),
    ({"id": "bank-a", "org": "o", "name": "n", "public_key": "ed25519:AAAA"}, "public_key"),
    ({"id": "bank-a", "org": "o", "name": "n", "extra": 1}, "extra"),
])
def test_bad_client_bodies_name_the_field(api, body, field):
    body = {"public_key": encode_public_key(generate_signing_key()), **body}
    r = api.post("/api/v1/clients", headers=auth(api, "admin"), json=body)
    assert r.status_code == 422 and field in r.json()["detail"], r.text
    assert api.get("/api/v1/clients", headers=auth(api, "admin")).json()["total"] == 0


@pytest.mark.parametrize(("over", "field"), [
    ({"rounds": 0}, "rounds"),
    ({"min_clients": 3}, "min_clients"),
    ({"base_digest": "0" * 64}, "base_digest"),
    ({"privacy": {"target_epsilon": float("inf")}}, "target_epsilon"),
    ({"privacy": {"enabled": False}}, "enabled"),
    ({"aggregation": {"method": "dp_fedavg", "clip_norm": 1.0}}, "noise_multiplier"),
    ({"aggregation": {"method": "fedavg"}}, "ffa"),
    ({"clients": ["bank-a", "bank-a"]}, "twice"),
    ({"max_client_epsilon": 1.0}, "max_client_epsilon"),
    ({"train": {"optimizer": "adam"}}, "optimizer"),
    ({"train": {"momentum": 0.9}}, "train.momentum 0.9 is for optimizer 'sgd'"),
])
def test_bad_job_bodies_are_refused_and_nothing_is_written(api, over, field):
    register(api, "bank-a")
    register(api, "bank-b")
    r = api.post("/api/v1/jobs", headers={**auth(api, "operator"), "Content-Type": "application/json"},
                 content=json.dumps(job_body(api, **over), allow_nan=True))
    assert r.status_code == 422 and field in r.text, r.text
    with api.ctx.sessions() as s:
        assert s.execute(select(Job)).first() is None and s.execute(select(AdapterVersion)).first() is None
    assert not (api.ctx.blob_dir.exists() and any(api.ctx.blob_dir.iterdir()))


def test_job_with_unregistered_or_revoked_client_is_refused(api):
    register(api, "bank-a")
    r = api.post("/api/v1/jobs", headers=auth(api, "operator"), json=job_body(api))
    assert r.status_code == 409 and "'bank-b' is not registered" in r.json()["detail"]
    register(api, "bank-b")
    api.post("/api/v1/clients/bank-b/revoke", headers=auth(api, "operator"))
    r = api.post("/api/v1/jobs", headers=auth(api, "operator"), json=job_body(api))
    assert r.status_code == 409 and "'bank-b' is revoked" in r.json()["detail"]


def test_job_life_cycle_and_version_zero(api):
    register(api, "bank-a")
    register(api, "bank-b")
    r = api.post("/api/v1/jobs", headers=auth(api, "operator"), json=job_body(api))
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "created" and job["latest_version"] == 0 and job["rounds_done"] == 0
    assert job["config"]["train"]["privacy"]["target_epsilon"] == 4.0
    assert api.post("/api/v1/jobs", headers=auth(api, "operator"), json=job_body(api)).status_code == 409
    steps = [("pause", 409), ("resume", 409), ("start", 200), ("start", 409), ("pause", 200), ("pause", 409),
             ("resume", 200), ("abort", 200), ("resume", 409), ("abort", 409)]
    statuses = []
    for action, code in steps:
        r = api.post(f"/api/v1/jobs/job-1/{action}", headers=auth(api, "operator"))
        assert r.status_code == code, (action, r.text)
        if code == 200:
            statuses.append(r.json()["status"])
        else:
            assert "cannot" in r.json()["detail"]
    assert statuses == ["running", "paused", "running", "aborted"]
    changes = [(e.action, e.context.get("from"), e.context.get("to")) for e in audit_rows(api)
               if e.action.startswith("job.") and e.outcome == "success"]
    assert changes == [("job.create", None, None), ("job.start", "created", "running"),
                       ("job.pause", "running", "paused"), ("job.resume", "paused", "running"),
                       ("job.abort", "running", "aborted")]
    # version 0: B = 0 for every adapted module (FFA: only B is exchanged)
    versions = api.get("/api/v1/jobs/job-1/adapters", headers=auth(api, "auditor")).json()["items"]
    assert [v["version"] for v in versions] == [0]
    raw = api.get("/api/v1/jobs/job-1/adapters/0/download?format=safetensors", headers=auth(api, "operator"))
    tensors = load_safetensors(raw.content)
    assert tensors and all(".lora_B." in n and not t.any() for n, t in tensors.items())
    assert "sha256:" + hashlib.sha256(raw.content).hexdigest() == versions[0]["digest"]


def test_peft_download_has_a_and_b(api):
    register(api, "bank-a")
    register(api, "bank-b")
    assert api.post("/api/v1/jobs", headers=auth(api, "operator"), json=job_body(api)).status_code == 201
    r = api.get("/api/v1/jobs/job-1/adapters/0/download", headers=auth(api, "admin"))
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(r.content))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(archive.namelist())
    config = json.loads(archive.read("adapter_config.json"))
    assert config["r"] == 2 and {t.rsplit(".", 1)[-1] for t in config["target_modules"]} == {"q_a_proj", "o_proj"}
    tensors = load_safetensors(archive.read("adapter_model.safetensors"))
    assert any(".lora_A." in n for n in tensors) and any(".lora_B." in n for n in tensors)


def test_promote_and_rollback(api):
    register(api, "bank-a")
    register(api, "bank-b")
    api.post("/api/v1/jobs", headers=auth(api, "operator"), json=job_body(api))
    r = api.post("/api/v1/jobs/job-1/adapters/rollback", headers=auth(api, "operator"), json={"to_version": 0})
    assert r.status_code == 409 and "no promoted version" in r.json()["detail"]
    assert api.post("/api/v1/jobs/job-1/adapters/0/promote", headers=auth(api, "operator")).json()["promoted"]
    r = api.post("/api/v1/jobs/job-1/adapters/rollback", headers=auth(api, "operator"), json={"to_version": 0})
    assert r.status_code == 409 and "not earlier" in r.json()["detail"]
    assert api.post("/api/v1/jobs/job-1/adapters/7/promote", headers=auth(api, "operator")).status_code == 404


def test_pagination_is_bounded(api):
    for i in range(5):
        register(api, f"c{i}")
    page = api.get("/api/v1/clients?limit=2&offset=2", headers=auth(api, "admin")).json()
    assert [c["id"] for c in page["items"]] == ["c2", "c3"] and page["next_offset"] == 4 and page["total"] == 5
    r = api.get("/api/v1/clients?limit=100000", headers=auth(api, "admin"))
    assert r.status_code == 422 and "limit" in r.json()["detail"]


def test_body_size_limit(api):
    r = api.post("/api/v1/clients", headers={**auth(api, "admin"), "Content-Type": "application/json"},
                 content=b"{" + b" " * (2 << 20) + b"}")
    assert r.status_code == 413
    assert audit_rows(api)[-1].reason_code == "body_too_large"


def test_metrics_prometheus_text(api):
    register(api, "bank-a")
    text = api.get("/api/v1/metrics", headers=auth(api, "operator")).text
    assert 'fedtune_clients{status="active"} 1.0' in text
    assert "# TYPE fedtune_api_requests_total counter" in text
    assert 'fedtune_api_requests_total{action="client.register",outcome="success"} 1.0' in text


def test_audit_query_filters(api):
    register(api, "bank-a")
    api.get("/api/v1/clients", headers=auth(api, "auditor"))
    r = api.get("/api/v1/audit/events?action=client.register", headers=auth(api, "auditor")).json()
    assert [e["resource_id"] for e in r["items"]] == ["bank-a"]
    assert api.get("/api/v1/audit/events?outcome=denied", headers=auth(api, "auditor")).status_code == 200
    assert api.get("/api/v1/audit/events?action=drop.table", headers=auth(api, "auditor")).status_code == 422
    naive = api.get("/api/v1/audit/events?since=2026-01-01T00:00:00", headers=auth(api, "auditor"))
    assert naive.status_code == 422 and "since" in naive.json()["detail"]


def test_audit_export_and_verify_through_the_api(api, tmp_path):
    from fedtune.compliance.verify import verify_export

    register(api, "bank-a")
    r = api.post("/api/v1/audit/export", headers=auth(api, "auditor"), json={"format": "jsonl"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path / "export")
    key = api.app.state.settings.signing_key.public_key()
    assert verify_export(tmp_path / "export", pubkey=key).ok
    v = api.post("/api/v1/audit/verify", headers=auth(api, "auditor")).json()
    assert v["ok"] and v["since_tree_size"] is not None and v["first_bad_seq"] is None, v
    checkpoints = api.get("/api/v1/audit/checkpoints", headers=auth(api, "auditor")).json()["items"]
    assert len(checkpoints) == 2 and checkpoints[0]["tree_size"] < checkpoints[1]["tree_size"]


# --- SuperNode keys and key rotation ---------------------------------------------------------


def ssh_public_key(curve: ec.EllipticCurve | None = None, comment: str = "") -> str:
    """An OpenSSH public key line as ``ssh-keygen`` writes it (ECDSA P-384 unless told otherwise)."""
    key = ed25519.Ed25519PrivateKey.generate() if curve is None else ec.generate_private_key(curve)
    line = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    return f"{line} {comment}" if comment else line


def p384_key(comment: str = "") -> str:
    return ssh_public_key(ec.SECP384R1(), comment)


def test_verify_of_a_store_altered_behind_its_triggers_fails_and_export_is_a_409(api, store_engine):
    register(api, "bank-a")
    assert api.post("/api/v1/audit/verify", headers=auth(api, "auditor")).json()["ok"] is True
    tamperer = DatabaseTamperer(store_engine)
    tamperer.drop_triggers()
    tamperer.execute("UPDATE audit_events SET outcome = 'failure' WHERE seq = 2")
    r = api.post("/api/v1/audit/verify", headers=auth(api, "auditor"))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["ok"] is False and out["first_bad_seq"] == 2 and "seq 2" in out["first_problem"]
    assert out["summary"].startswith("FAILED") and out["records"] >= 3
    r = api.post("/api/v1/audit/export", headers=auth(api, "auditor"), json={"format": "jsonl"})
    assert r.status_code == 409 and "not sound" in r.json()["detail"]


def client_body(client_id: str, **over) -> dict:
    return {"id": client_id, "org": f"org-{client_id}", "name": client_id,
            "public_key": encode_public_key(generate_signing_key()), **over}


def test_register_with_a_node_key_stores_it_without_its_comment(api):
    key = p384_key()
    r = api.post("/api/v1/clients", headers=auth(api, "operator"),
                 json=client_body("bank-a", node_public_key=f"{key} ops@bank-a\n"))
    assert r.status_code == 201, r.text
    assert r.json()["node_public_key"] == key and r.json()["flower_node_id"] is None
    assert api.get("/api/v1/clients/bank-a", headers=auth(api, "auditor")).json()["node_public_key"] == key
    assert register(api, "bank-b")["node_public_key"] is None  # the node key is optional
    event = next(e for e in audit_rows(api) if e.action == "client.register" and e.resource_id == "bank-a")
    assert event.context["node_public_key"] == key


@pytest.mark.parametrize("node_key", [
    ssh_public_key(ec.SECP256R1()),  # Flower accepts P-256, but agents write P-384: refuse the mix-up
    ssh_public_key(),  # ssh-ed25519
    "ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlzdHAzODQAAAABAA==",  # a compressed point
    "ecdsa-sha2-nistp384 AAAA",
    "-----BEGIN PUBLIC KEY-----",
], ids=["p256", "ed25519", "compressed", "truncated", "pem"])
def test_bad_node_keys_are_a_422_naming_the_field(api, node_key):
    r = api.post("/api/v1/clients", headers=auth(api, "operator"), json=client_body("bank-a", node_public_key=node_key))
    assert r.status_code == 422 and "node_public_key" in r.json()["detail"], r.text
    register(api, "bank-b")
    r = api.post("/api/v1/clients/bank-b/keys", headers=auth(api, "operator"), json={"node_public_key": node_key})
    assert r.status_code == 422 and "node_public_key" in r.json()["detail"], r.text
    with api.ctx.sessions() as s:
        assert s.execute(select(Client.id)).scalars().all() == ["bank-b"]


def test_a_node_key_belongs_to_one_client(api):
    key = p384_key()
    assert api.post("/api/v1/clients", headers=auth(api, "operator"),
                    json=client_body("bank-a", node_public_key=key)).status_code == 201
    # the same key under another comment is the same key
    r = api.post("/api/v1/clients", headers=auth(api, "operator"),
                 json=client_body("bank-b", node_public_key=f"{key} other-comment"))
    assert r.status_code == 409 and "node_public_key" in r.json()["detail"]
    register(api, "bank-b")
    r = api.post("/api/v1/clients/bank-b/keys", headers=auth(api, "operator"), json={"node_public_key": key})
    assert r.status_code == 409 and "node_public_key" in r.json()["detail"]
    taken = api.get("/api/v1/clients/bank-a", headers=auth(api, "admin")).json()["public_key"]
    r = api.post("/api/v1/clients/bank-b/keys", headers=auth(api, "operator"), json={"public_key": taken})
    assert r.status_code == 409 and "public_key" in r.json()["detail"]


def test_rotation_replaces_keys_retires_the_node_and_audits_old_and_new(api):
    old_node, new_node = p384_key(), p384_key()
    old_receipt, new_receipt = (encode_public_key(generate_signing_key()) for _ in range(2))
    api.post("/api/v1/clients", headers=auth(api, "operator"),
             json=client_body("bank-a", public_key=old_receipt, node_public_key=old_node))
    with api.ctx.sessions.begin() as s:  # what the job supervisor writes once Flower registered the key
        s.get(Client, "bank-a").flower_node_id = 2**64 - 3
    # the receipt key alone: the node registration stays
    r = api.post("/api/v1/clients/bank-a/keys", headers=auth(api, "operator"), json={"public_key": new_receipt})
    assert r.status_code == 200, r.text
    assert (r.json()["public_key"], r.json()["node_public_key"], r.json()["flower_node_id"]) == (
        new_receipt, old_node, 2**64 - 3)
    # the node key: the old registration is retired for the supervisor to unregister, the new one waits
    r = api.post("/api/v1/clients/bank-a/keys", headers=auth(api, "admin"), json={"node_public_key": new_node})
    assert r.status_code == 200, r.text
    assert r.json()["node_public_key"] == new_node and r.json()["flower_node_id"] is None
    with api.ctx.sessions() as s:
        retired = s.execute(select(RetiredFlowerNode)).scalars().all()
    assert [(n.flower_node_id, n.client_id, n.node_public_key, n.reason, n.unregistered_at) for n in retired] == [
        (2**64 - 3, "bank-a", old_node, "rotated", None)]
    rotations = [e for e in audit_rows(api) if e.action == "client.rotate_keys"]
    assert [(e.outcome, e.resource_id) for e in rotations] == [("success", "bank-a")] * 2
    assert rotations[0].context["public_key"] == {"old": old_receipt, "new": new_receipt}
    assert "node_public_key" not in rotations[0].context
    assert rotations[1].context["node_public_key"] == {"old": old_node, "new": new_node}
    assert rotations[1].context["retired_flower_node_id"] == 2**64 - 3
    assert "PRIVATE" not in json.dumps([e.context for e in rotations])
    # Flower never registers a key twice (not even after unregistering it): a retired key is refused
    r = api.post("/api/v1/clients/bank-a/keys", headers=auth(api, "operator"), json={"node_public_key": old_node})
    assert r.status_code == 409 and "retired" in r.json()["detail"]
    r = api.post("/api/v1/clients", headers=auth(api, "operator"),
                 json=client_body("bank-b", node_public_key=old_node))
    assert r.status_code == 409 and "node_public_key" in r.json()["detail"]


def test_rotation_needs_an_active_client_and_a_key(api):
    register(api, "bank-a")
    r = api.post("/api/v1/clients/bank-a/keys", headers=auth(api, "operator"), json={})
    assert r.status_code == 422 and "node_public_key" in r.json()["detail"]
    r = api.post("/api/v1/clients/nobody/keys", headers=auth(api, "operator"), json={"node_public_key": p384_key()})
    assert r.status_code == 404
    api.post("/api/v1/clients/bank-a/revoke", headers=auth(api, "operator"))
    before = api.get("/api/v1/clients/bank-a", headers=auth(api, "admin")).json()
    r = api.post("/api/v1/clients/bank-a/keys", headers=auth(api, "operator"),
                 json={"public_key": encode_public_key(generate_signing_key()), "node_public_key": p384_key()})
    assert r.status_code == 409 and "revoked" in r.json()["detail"]
    assert api.get("/api/v1/clients/bank-a", headers=auth(api, "admin")).json() == before
    assert [e.outcome for e in audit_rows(api) if e.action == "client.rotate_keys"] == ["failure"] * 3


def test_replies_signed_with_the_rotated_away_receipt_key_are_rejected(api):
    old, new = generate_signing_key(), generate_signing_key()
    register(api, "bank-a", old)
    api.post("/api/v1/clients/bank-a/keys", headers=auth(api, "operator"), json={"public_key": encode_public_key(new)})
    current = {"layers.0.q.lora_B.weight": torch.zeros(4, 2)}
    instruction = TrainInstruction(job_id="job-1", round=1, nonce=b"\x05" * 32, base_digest="sha256:base",
                                   config={}, adapter=current)
    expected = RoundExpectation(job_id="job-1", round=1, nonce=b"\x05" * 32, base_digest="sha256:base",
                                current=current)
    with api.ctx.sessions() as s:
        clients = registered_clients(s)  # what the round engine checks replies against

    def reply(key):
        return sign_train_reply(instruction, client_id="bank-a", tensors={n: t + 0.01 for n, t in current.items()},
                                records=10, epsilon=1.0, delta=1e-6, sample_rate=0.5,
                                noise_multiplier=1.0, steps=4, accountant="rdp", private_key=key)

    stale = validate_reply(reply(old), expected=expected, clients=clients)
    assert isinstance(stale, Rejected) and stale.reason_code == RejectReason.BAD_SIGNATURE
    assert isinstance(validate_reply(reply(new), expected=expected, clients=clients), Accepted)


# --- security review: receipt keys are points (finding 7) ----------------------------------------------

ZERO_KEY = "ed25519:" + base64.b64encode(bytes(32)).decode()  # the finding's key: order 4
IDENTITY_RAW = b"\x01" + bytes(31)
IDENTITY_KEY = "ed25519:" + base64.b64encode(IDENTITY_RAW).decode()  # order 1: every forged receipt verifies
NON_CANONICAL_KEY = "ed25519:" + base64.b64encode((2**255 - 18).to_bytes(32, "little")).decode()  # y = p + 1
FORGED_SIGNATURE = IDENTITY_RAW + bytes(32)  # R = identity, S = 0: made without any private key


@pytest.mark.parametrize("key", [ZERO_KEY, IDENTITY_KEY, NON_CANONICAL_KEY], ids=["zero", "identity", "y=p+1"])
def test_small_order_receipt_keys_are_a_422_naming_public_key(api, key):
    r = api.post("/api/v1/clients", headers=auth(api, "operator"), json=client_body("bank-a", public_key=key))
    assert r.status_code == 422 and "public_key" in r.json()["detail"], r.text
    assert "small order" in r.json()["detail"] or "not a canonical" in r.json()["detail"]
    good = register(api, "bank-b")["public_key"]
    r = api.post("/api/v1/clients/bank-b/keys", headers=auth(api, "operator"), json={"public_key": key})
    assert r.status_code == 422 and "public_key" in r.json()["detail"], r.text
    assert api.get("/api/v1/clients/bank-b", headers=auth(api, "admin")).json()["public_key"] == good
    with api.ctx.sessions() as s:
        assert s.execute(select(Client.id)).scalars().all() == ["bank-b"]


def test_a_stored_small_order_key_verifies_no_forged_receipt(api):
    """A key stored before keys were checked (written straight into the store): the library would
    take the forged receipt under it; the coordinator refuses the key, so the reply is bad_signature."""
    with api.ctx.sessions.begin() as s:
        s.add(Client(id="bank-a", org="o", name="n", public_key=IDENTITY_KEY))
    current = {"layers.0.q.lora_B.weight": torch.zeros(4, 2)}
    instruction = TrainInstruction(job_id="job-1", round=1, nonce=b"\x07" * 32, base_digest="sha256:base",
                                   config={}, adapter=current)
    expected = RoundExpectation(job_id="job-1", round=1, nonce=b"\x07" * 32, base_digest="sha256:base",
                                current=current)
    signed = sign_train_reply(instruction, client_id="bank-a", tensors={n: t + 0.01 for n, t in current.items()},
                              records=10, epsilon=1.0, delta=1e-6, sample_rate=0.5, noise_multiplier=1.0,
                              steps=4, accountant="rdp", private_key=generate_signing_key())
    forged = dataclasses.replace(signed, receipt=dataclasses.replace(signed.receipt, signature=FORGED_SIGNATURE))
    assert forged.receipt.verify(ed25519.Ed25519PublicKey.from_public_bytes(IDENTITY_RAW))  # the library's view
    with api.ctx.sessions() as s:
        clients = registered_clients(s)
    outcome = validate_reply(forged, expected=expected, clients=clients)
    assert isinstance(outcome, Rejected) and outcome.reason_code == RejectReason.BAD_SIGNATURE


# --- security review: safe job defaults (finding 3) ----------------------------------------------------


def _job_event(api, job_id: str) -> AuditEvent:
    return next(e for e in audit_rows(api) if e.action == "job.create" and e.resource_id == job_id
                and e.outcome == "success")


def test_a_job_needs_a_norm_bound_or_an_explicit_none(api):
    register(api, "bank-a")
    register(api, "bank-b")
    missing = job_body(api)
    del missing["norm_bound"]
    for body in (missing, job_body(api, norm_bound=None), job_body(api, norm_bound=0),
                 job_body(api, norm_bound="off")):
        r = api.post("/api/v1/jobs", headers=auth(api, "operator"), json=body)
        assert r.status_code == 422 and "norm_bound" in r.json()["detail"], (body.get("norm_bound"), r.text)
    r = api.post("/api/v1/jobs", headers=auth(api, "operator"), json=job_body(api, "job-open", norm_bound="none"))
    assert r.status_code == 201, r.text
    config = r.json()["config"]
    assert config["norm_bound"] is None and config["norm_bound_opt_out"] is True
    assert JobPlan.from_config(config).norm_bound is None  # the round engine's view
    assert _job_event(api, "job-open").context["norm_bound"] == "none"  # the choice is on the record
    r = api.post("/api/v1/jobs", headers=auth(api, "operator"), json=job_body(api, "job-bound", norm_bound=5))
    assert r.status_code == 201, r.text
    config = r.json()["config"]
    assert config["norm_bound"] == 5.0 and config["norm_bound_opt_out"] is False
    assert JobPlan.from_config(config).norm_bound == 5.0
    assert _job_event(api, "job-bound").context["norm_bound"] == 5.0


def test_a_job_made_through_the_api_rejects_a_1e6x_update(api):
    key = generate_signing_key()
    register(api, "bank-a", key)
    register(api, "bank-b")
    r = api.post("/api/v1/jobs", headers=auth(api, "operator"), json=job_body(api, norm_bound=1.0))
    plan = JobPlan.from_config(r.json()["config"])
    current = {"layers.0.q.lora_B.weight": torch.zeros(4, 2)}
    instruction = TrainInstruction(job_id="job-1", round=1, nonce=b"\x09" * 32, base_digest="sha256:base",
                                   config={}, adapter=current)
    expected = RoundExpectation(job_id="job-1", round=1, nonce=b"\x09" * 32, base_digest="sha256:base",
                                current=current, norm_bound=plan.norm_bound)
    with api.ctx.sessions() as s:
        clients = registered_clients(s)

    def reply(scale: float):
        return sign_train_reply(instruction, client_id="bank-a",
                                tensors={n: t + 0.01 * scale for n, t in current.items()}, records=10,
                                epsilon=1.0, delta=1e-6, sample_rate=0.5, noise_multiplier=1.0, steps=4,
                                accountant="rdp", private_key=key)

    assert isinstance(validate_reply(reply(1.0), expected=expected, clients=clients), Accepted)
    huge = validate_reply(reply(1e6), expected=expected, clients=clients)
    assert isinstance(huge, Rejected) and huge.reason_code == RejectReason.NORM_EXCEEDED


@pytest.mark.parametrize(("min_clients", "trim", "ok"), [
    (2, 0.1, False), (5, 0.1, False), (9, 0.1, False), (5, 0.0, False), (2, 0.49, False),
    (10, 0.1, True), (5, 0.2, True), (3, 0.34, True),
])
def test_a_trimmed_mean_that_trims_nothing_is_refused(api, min_clients, trim, ok):
    clients = [f"site-{i}" for i in range(10)]
    body = job_body(api, clients=clients, min_clients=min_clients,
                    aggregation={"method": "trimmed_mean", "trim_fraction": trim},
                    lora={"rank": 2, "ffa": False, "target_modules": ["q_a_proj", "o_proj"]})
    if not ok:
        r = api.post("/api/v1/jobs", headers=auth(api, "operator"), json=body)
        assert r.status_code == 422 and "aggregation.trim_fraction" in r.json()["detail"], r.text
        return
    for client in clients:
        register(api, client)
    r = api.post("/api/v1/jobs", headers=auth(api, "operator"), json=body)
    assert r.status_code == 201, r.text


# --- security review: the admin API's edges (finding 8) ------------------------------------------------


@pytest.mark.parametrize(("param", "value"), [("since", "0001-01-01T00:00:00+00:01"),
                                              ("until", "9999-12-31T23:59:59-23:59")])
def test_times_outside_the_stores_range_are_a_422_naming_the_parameter(api, param, value):
    r = api.get("/api/v1/audit/events", params={param: value}, headers=auth(api, "auditor"))
    assert r.status_code == 422 and param in r.json()["detail"] and "1-9999" in r.json()["detail"], r.text
    r = api.post("/api/v1/audit/export", headers=auth(api, "auditor"), json={param: value})
    assert r.status_code == 422 and param in r.json()["detail"] and "1-9999" in r.json()["detail"], r.text
    edge = "0001-01-01T00:00:00Z" if param == "since" else "9999-12-31T23:59:59Z"  # the range's own ends
    r = api.get("/api/v1/audit/events", params={param: edge}, headers=auth(api, "auditor"))
    assert r.status_code == 200 and r.json()["total"] > 0, r.text
    r = api.post("/api/v1/audit/export", headers=auth(api, "auditor"), json={param: edge})
    assert r.status_code == 200, r.text


def test_every_response_says_nosniff(api):
    responses = [api.get("/healthz"), api.get("/openapi.json"), api.get("/api/v1/clients"),
                 api.get("/api/v1/clients", headers=auth(api, "admin")),
                 api.post("/api/v1/clients", headers=auth(api, "admin"), json={}),
                 api.get("/api/v1/nothing-here", headers=auth(api, "admin")),
                 api.get("/api/v1/metrics", headers=auth(api, "auditor"))]
    assert [r.status_code for r in responses] == [200, 200, 401, 200, 422, 404, 403]
    assert all(r.headers.get("x-content-type-options") == "nosniff" for r in responses)


def test_operator_text_reaches_the_markdown_record_escaped(api):
    from markdown_it import MarkdownIt

    api.post("/api/v1/clients", headers=auth(api, "operator"),
             json=client_body("bank-a", org="<img src=x onerror=alert(1)>"))
    register(api, "bank-b")
    processing = {"purpose": "[click](javascript:alert(1)) \u202etxt.exe", "legal_basis": "**art. 6** `x` | y",
                  "data_categories": ["<script>alert(1)</script>", "![p](http://evil.example/x.png)"]}
    assert api.post("/api/v1/jobs", headers=auth(api, "operator"),
                    json=job_body(api, processing=processing)).status_code == 201
    r = api.get("/api/v1/jobs/job-1/processing-record?format=markdown", headers=auth(api, "auditor"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/markdown")
    assert r.headers["x-content-type-options"] == "nosniff"
    html = MarkdownIt("commonmark").enable("table").render(r.text)  # an auditor's viewer (raw HTML allowed)
    for markup in ("<img", "<script", "<a ", "<strong", "<code", "\u202e"):
        assert markup not in html, (markup, html)
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "[click](javascript:alert(1))" in html
    assert "&lt;U+202E&gt;txt.exe" in html and "**art. 6** `x` | y" in html


def test_operators_see_and_lift_a_strike_suspension(api):
    """The strike policy suspends a client from a job (the round engine); operators see it and lift it,
    audited; auditors see it and cannot lift it."""
    from fedtune.coordinator.store import JobSuspension

    register(api, "bank-a")
    register(api, "bank-b")
    assert api.post("/api/v1/jobs", headers=auth(api, "operator"), json=job_body(api)).status_code == 201
    with api.ctx.sessions.begin() as s:
        s.add(JobSuspension(job_id="job-1", client_id="bank-b", reason="3 signed updates rejected within 5 rounds"))
    listed = api.get("/api/v1/jobs/job-1/suspensions", headers=auth(api, "auditor"))
    assert listed.status_code == 200
    assert [(r["client_id"], r["lifted_at"]) for r in listed.json()] == [("bank-b", None)]
    assert api.post("/api/v1/jobs/job-1/suspensions/bank-b/lift", headers=auth(api, "auditor")).status_code == 403
    lifted = api.post("/api/v1/jobs/job-1/suspensions/bank-b/lift", headers=auth(api, "operator"))
    assert lifted.status_code == 200 and lifted.json()[0]["lifted_at"] is not None
    assert lifted.json()[0]["lifted_by"]
    assert api.post("/api/v1/jobs/job-1/suspensions/bank-b/lift", headers=auth(api, "operator")).status_code == 404
    events = [e for e in audit_rows(api) if e.action == "suspension.lift"]
    assert [e.outcome for e in events] == ["denied", "success", "failure"]
