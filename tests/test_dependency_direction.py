"""The parts depend one way (DESIGN.md, "The parts"): ``kernels <- model <- client_agent``,
``model <- coordinator``, ``compliance <- coordinator | client_agent``; ``cli`` is the composition
root that no part imports.

Checked statically: every ``.py`` file of a part is parsed with ``ast`` (nothing is imported, so a
lazy import inside a function or under ``TYPE_CHECKING`` counts as much as one at the top), and each
``import`` / ``from ... import`` (relative ones resolved) and each ``importlib.import_module`` /
``__import__`` of a literal name is matched against the parts that part must not reach.

What two parts share lives where both can import it: the adapter contract in
``fedtune.model.adapters``, the wire protocol and signatures in ``fedtune.compliance``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# part -> the parts it must never import.
FORBIDDEN: dict[str, frozenset[str]] = {
    "kernels": frozenset({"model", "client_agent", "coordinator", "compliance", "cli"}),
    "model": frozenset({"client_agent", "coordinator", "compliance", "cli"}),
    "compliance": frozenset({"client_agent", "coordinator", "cli"}),
    "coordinator": frozenset({"client_agent", "cli"}),
    "client_agent": frozenset({"coordinator", "cli"}),
}


def _module_name(path: Path) -> str:
    """``coordinator/api/schemas.py`` -> ``fedtune.coordinator.api.schemas`` (``__init__.py``: the package)."""
    parts = path.relative_to(REPO).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("fedtune", *parts))


def imported_modules(source: str, module: str, *, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, the code of ``module``.

    ``from X import a`` yields both ``X`` and ``X.a`` (``a`` may be a submodule: ``from fedtune
    import client_agent``); a relative import is resolved against ``module``'s package.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def forbidden_imports(source: str, module: str, forbidden: frozenset[str], *, is_package: bool = False) -> list[str]:
    """``"line N: fedtune.<part>..."`` for each import of a forbidden part in ``source``."""
    hits = {(line, name) for line, name in imported_modules(source, module, is_package=is_package)
            if name.split(".")[0] == "fedtune" and name.split(".")[1:2] and name.split(".")[1] in forbidden}
    # `from X import a` on a forbidden X: name X once, not also X.a
    shortest = {(line, name) for line, name in hits if not any(
        other_line == line and name.startswith(other + ".") for other_line, other in hits)}
    return [f"line {line}: {name}" for line, name in sorted(shortest)]


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_no_part_imports_a_part_it_must_not(part):
    files = sorted(p for p in (REPO / part).rglob("*.py") if "__pycache__" not in p.parts)
    assert files, f"no Python files under {REPO / part}"
    violations = []
    for path in files:
        hits = forbidden_imports(path.read_text(), _module_name(path), FORBIDDEN[part],
                                 is_package=path.name == "__init__.py")
        violations += [f"{path.relative_to(REPO)} {hit}" for hit in hits]
    assert not violations, (f"{part}/ must not import {', '.join(sorted(FORBIDDEN[part]))}; move what both sides "
                            f"need where both can depend on it (DESIGN.md):\n" + "\n".join(violations))


@pytest.mark.parametrize("source", [
    "from fedtune.client_agent.lora import LoraSettings",
    "import fedtune.client_agent.daemon",
    "from fedtune import client_agent",
    "def f():\n    from fedtune.client_agent.daemon import initial_adapter_state",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fedtune.client_agent.lora import LoraSettings",
    "from ...client_agent import lora",
    "import importlib\nimportlib.import_module('fedtune.client_agent.lora')",
])
def test_the_check_sees_every_form_of_import(source):
    # The check must catch what coordinator/jobs.py once did (a lazy import of the agent), however written.
    module = "fedtune.coordinator.api.schemas"
    assert forbidden_imports(source, module, FORBIDDEN["coordinator"]), source


@pytest.mark.parametrize("source", [
    "from fedtune.model.adapters import LoraSettings",
    "from .store import Job",
    "from ..aggregation import AGGREGATORS",
    "clientapp = 'fedtune.client_agent.flower_app:app'",  # a name the SuperLink resolves, not an import
])
def test_the_check_allows_what_the_coordinator_may_import(source):
    assert forbidden_imports(source, "fedtune.coordinator.api.schemas", FORBIDDEN["coordinator"]) == []
