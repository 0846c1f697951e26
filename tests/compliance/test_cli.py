"""`fedtune audit`: keygen, export, verify (exit codes, the first bad record named), checkpoint;
the verifier runs without the coordinator's store and without the network."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from fedtune.cli import app
from fedtune.coordinator.store import AuditEvent, append_audit_event

runner = CliRunner()


def _run(*args, env=None):
    result = runner.invoke(app, ["audit", *map(str, args)], env=env)
    return result.exit_code, result.output


@pytest.fixture
def key_file(tmp_path, monkeypatch):
    code, out = _run("keygen", "--out", tmp_path / "coordinator-key.pem")
    assert code == 0, out
    monkeypatch.setenv("FEDTUNE_COORDINATOR_KEY_FILE", str(tmp_path / "coordinator-key.pem"))
    return tmp_path / "coordinator-key.pem"


@pytest.fixture
def store_url(database_url, sessions):
    with sessions.begin() as s:
        for job in ("job-1", "job-2", "job-1"):
            append_audit_event(s, action="job.started", actor_type="coordinator", actor_id="round-engine",
                               resource_type="job", resource_id=job, outcome="success", context={"job_id": job})
    return database_url


def test_keygen_writes_a_private_key_only_its_owner_reads(key_file):
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.with_name("coordinator-key.pub.pem").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    code, out = _run("keygen", "--out", key_file)
    assert code == 1 and "never overwritten" in out


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_then_verify(store_url, key_file, sessions, tmp_path, fmt):
    out = tmp_path / "export"
    code, text = _run("export", "--format", fmt, "--out", out, "--database-url", store_url)
    assert code == 0, text
    assert "exported 3 records (all)" in text
    with sessions() as s:  # the export is itself audited, after the checkpoint it signed
        assert s.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)).all()[-2:] == \
            ["audit.checkpoint_signed", "audit.export"]
    pubkey = key_file.with_name("coordinator-key.pub.pem")
    code, text = _run("verify", out, "--pubkey", pubkey)
    assert code == 0 and text.startswith("OK: 3 records"), text

    filtered = tmp_path / "job-1"
    code, text = _run("export", "--format", fmt, "--out", filtered, "--job", "job-1", "--from", "2000-01-01",
                      "--database-url", store_url)
    assert code == 0 and "exported 2 records (filtered)" in text, text
    code, text = _run("verify", filtered, "--pubkey", pubkey, "--since-checkpoint", out / "checkpoint.json")
    assert code == 0, text

    records = out / f"records.{fmt}"
    records.write_text(records.read_text().replace("job-2", "job-9"))
    code, text = _run("verify", out, "--pubkey", pubkey)
    assert code == 1
    assert text.startswith("FAILED at seq 2: seq 2 [content]")


def test_export_needs_the_coordinator_key_and_a_database(store_url, tmp_path, monkeypatch):
    monkeypatch.delenv("FEDTUNE_COORDINATOR_KEY_FILE", raising=False)
    code, text = _run("export", "--out", tmp_path / "x", "--database-url", store_url)
    assert code == 1 and "FEDTUNE_COORDINATOR_KEY_FILE" in text
    key = tmp_path / "open.pem"
    _run("keygen", "--out", key)
    key.chmod(0o644)
    code, text = _run("export", "--out", tmp_path / "x", "--database-url", store_url, "--key-file", key)
    assert code == 1 and "chmod 600" in text
    monkeypatch.delenv("FEDTUNE_DATABASE_URL", raising=False)
    key.chmod(0o600)
    code, text = _run("export", "--out", tmp_path / "x", "--key-file", key)
    assert code == 1 and "FEDTUNE_DATABASE_URL" in text


def test_checkpoint_command(store_url, key_file):
    code, text = _run("checkpoint", "--database-url", store_url)
    assert code == 0, text
    assert json.loads(text)["tree_size"] == 3


VERIFY_OFFLINE = """
import socket, sys
def no_network(*a, **k):
    raise AssertionError("the verifier opened a socket")
socket.socket = socket.create_connection = no_network
from fedtune.compliance.verify import verify_export
result = verify_export(sys.argv[1], pubkey=sys.argv[2])
loaded = sorted(m for m in sys.modules if m.startswith(("fedtune.coordinator", "sqlalchemy", "fedtune.model")))
print(result.ok, loaded)
"""


def test_the_verifier_needs_no_store_and_no_network(store_url, key_file, tmp_path):
    _run("export", "--out", tmp_path / "export", "--database-url", store_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDTUNE_")}
    done = subprocess.run([sys.executable, "-c", VERIFY_OFFLINE, str(tmp_path / "export"),
                           str(key_file.with_name("coordinator-key.pub.pem"))],
                          capture_output=True, text=True, env=env, cwd=Path(tmp_path), check=True)
    assert done.stdout.strip() == "True []", done.stderr
