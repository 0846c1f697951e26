"""The project imports only as ``fedtune.*``, however it is run.

A fresh clone once failed at collection: transformers 5.25 imports Hugging Face's top-level
``kernels`` package, and with the repository root on ``sys.path`` (pytest's ``pythonpath = ["."]``,
``python -c`` / ``python -m`` or a notebook started at the root) our ``kernels/`` folder answered
instead (``cannot import name 'CUDAProperties' from 'kernels'``)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARTS = ("cli", "model", "kernels", "client_agent", "coordinator", "compliance")


def _on_path(entry: str) -> Path:
    return Path(entry or os.curdir).resolve()


def _fresh_interpreter(code: str) -> subprocess.CompletedProcess:
    """``python -c`` started at the repository root (which puts the root first on ``sys.path``), with
    this test process's own ``sys.path`` after it: whatever the test run puts there, the child has too."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_repository_root_is_not_on_sys_path():
    # pytest's `pythonpath = ["."]`, `python -m pytest` from the root or a sys.path insert in a conftest
    # would put it back; tests share helpers through tests/support/fedtune_testing instead.
    assert REPO not in [_on_path(p) for p in sys.path], sys.path


def test_transformers_and_fedtune_kernels_import_side_by_side_from_the_repository_root():
    try:
        hf_kernels = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` package is not installed (the lock installs it with transformers)")
    code = ("import json, kernels, transformers.modeling_utils, fedtune.kernels\n"
            "print(json.dumps({'kernels': kernels.__file__, 'fedtune.kernels': fedtune.kernels.__file__,\n"
            "                  'quant_linear': hasattr(fedtune.kernels, 'quant_linear')}))\n")
    done = _fresh_interpreter(code)
    assert done.returncode == 0, done.stderr[-3000:]
    files = json.loads(done.stdout.strip().splitlines()[-1])
    # `kernels` is Hugging Face's (the installed distribution), fedtune's folder is only fedtune.kernels
    assert Path(files["kernels"]).resolve() == Path(hf_kernels.locate_file("kernels/__init__.py")).resolve()
    assert Path(files["fedtune.kernels"]).resolve() == REPO / "kernels" / "__init__.py"
    assert files["quant_linear"]


@pytest.mark.parametrize("name", [p for p in PARTS if p != "kernels"])
def test_no_part_imports_by_its_folder_name_from_the_repository_root(name):
    done = _fresh_interpreter(f"import {name}")
    assert done.returncode == 1
    assert f"ModuleNotFoundError: No module named '{name}': this folder is fedtune.{name}" in done.stderr


def test_a_top_level_kernels_is_never_our_folder():
    # With Hugging Face's package installed it is that one (above); without it, not found.
    code = ("import sys\n"
            "sys.path[:] = [p for p in sys.path if 'site-packages' not in p]  # hide installed packages\n"
            "try:\n"
            "    import kernels\n"
            "except ModuleNotFoundError as e:\n"
            "    print('refused:', e)\n"
            "else:\n"
            "    print('imported:', kernels.__file__)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("refused: No module named 'kernels': this folder is fedtune.kernels"), done.stdout
