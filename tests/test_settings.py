"""Configuration read from the environment: each variable's name is written once, and the coordinator's
settings (coordinator/settings.py) hand the ServerApp exactly what ``serve`` configured."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

from fedtune.coordinator.settings import CoordinatorSettings

REPO = Path(__file__).resolve().parents[1]
PARTS = ("cli", "client_agent", "compliance", "coordinator", "kernels", "model")
ENV_NAME = re.compile(r"FEDTUNE_[A-Z0-9_]+")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (module, class, function)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def test_no_environment_variable_name_is_spelled_out_twice():
    """A string that IS a variable name (``"FEDTUNE_..."``, not a message mentioning one) appears once in the
    product's code: everything else asks the module that owns it."""
    seen: dict[str, list[str]] = defaultdict(list)
    for part in PARTS:
        for path in sorted((REPO / part).rglob("*.py")):
            tree = ast.parse(path.read_text())
            docstrings = _docstrings(tree)
            for node in ast.walk(tree):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                        and ENV_NAME.fullmatch(node.value)):
                    seen[node.value].append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert "FEDTUNE_AGENT_THREADS" in seen  # the scan sees the names it is about
    twice = {name: places for name, places in seen.items() if len(places) > 1}
    assert twice == {}


def test_env_names_follow_the_fields():
    assert CoordinatorSettings.env_name("database_url") == "FEDTUNE_DATABASE_URL"
    assert CoordinatorSettings.env_name("blob_key_file") == "FEDTUNE_BLOB_KEY_FILE"
    assert CoordinatorSettings.env_name("coordinator_key_file") == "FEDTUNE_COORDINATOR_KEY_FILE"
    with pytest.raises(KeyError):
        CoordinatorSettings.env_name("database")


def test_what_serve_hands_over_is_what_the_serverapp_reads(monkeypatch, tmp_path):
    for name in CoordinatorSettings.model_fields:
        monkeypatch.delenv(CoordinatorSettings.env_name(name), raising=False)
    written = CoordinatorSettings(database_url="sqlite:////srv/c.db", blob_dir=tmp_path / "blobs",
                                  blob_key_file=tmp_path / "blob.key", coordinator_key_file=tmp_path / "c.pem")
    env = written.to_env()
    assert env == {"FEDTUNE_DATABASE_URL": "sqlite:////srv/c.db", "FEDTUNE_BLOB_DIR": str(tmp_path / "blobs"),
                   "FEDTUNE_BLOB_KEY_FILE": str(tmp_path / "blob.key"),
                   "FEDTUNE_COORDINATOR_KEY_FILE": str(tmp_path / "c.pem")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert CoordinatorSettings() == written


def test_a_secret_is_handed_over_but_never_shown(monkeypatch):
    monkeypatch.setenv("FEDTUNE_BLOB_KEY", "c2VjcmV0")
    settings = CoordinatorSettings()
    assert "c2VjcmV0" not in repr(settings)
    assert settings.to_env()["FEDTUNE_BLOB_KEY"] == "c2VjcmV0"


def test_a_missing_setting_is_named(monkeypatch):
    monkeypatch.delenv("FEDTUNE_DATABASE_URL", raising=False)
    monkeypatch.delenv("FEDTUNE_BLOB_DIR", raising=False)
    with pytest.raises(ValueError, match="the ServerApp needs FEDTUNE_DATABASE_URL and FEDTUNE_BLOB_DIR"):
        CoordinatorSettings().require("database_url", "blob_dir", who="the ServerApp")


def test_an_empty_variable_is_unset_not_the_current_directory(monkeypatch):
    """``FEDTUNE_BLOB_DIR=`` must not put blobs (and the orphan-blob sweep) in the working directory."""
    for name in ("FEDTUNE_BLOB_DIR", "FEDTUNE_BLOB_KEY_FILE", "FEDTUNE_ROUND_METRICS_FILE", "FEDTUNE_DATABASE_URL"):
        monkeypatch.setenv(name, "")
    settings = CoordinatorSettings()
    assert (settings.blob_dir, settings.blob_key_file, settings.round_metrics_file, settings.database_url) == (
        None, None, None, None)
    with pytest.raises(ValueError, match="FEDTUNE_DATABASE_URL and FEDTUNE_BLOB_DIR"):
        settings.require("database_url", "blob_dir", who="the ServerApp")
