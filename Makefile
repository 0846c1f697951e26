# The README's two commands. Both create .venv themselves; nothing else needs installing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= out/demo
# Every install comes from the lock: each direct and transitive package at one version, with hashes.
LOCK := requirements.lock
# `make lock` only: the resolver, and where this platform keeps the CPU build of torch.
UV_VERSION := 0.13.9
FIND_LINKS ?= /opt/wheels

.PHONY: demo test lock

# Installed in two steps so that nothing outside the lock can come in: the locked packages (hashes
# checked, no dependency resolution), then fedtune itself, editable, with no dependencies and built
# with the locked setuptools. `pip check` fails if the lock is missing something.
$(BIN)/fedtune: pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	@touch $@

demo: $(BIN)/fedtune
	$(BIN)/fedtune demo --out $(DEMO_DIR)

# pytest's own script, not `python -m pytest`: `-m` would put the repository root on sys.path.
test: $(BIN)/fedtune
	$(BIN)/pytest

# Refresh the lock on purpose (a new dependency, a security fix, a tested upgrade), then run
# `make test` and commit both. Resolved for Linux x86-64, CPython 3.11, CPU torch (this platform);
# the build backend (setuptools, wheel) is locked with the rest.
lock:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	printf 'setuptools>=68\nwheel\n' | $(BIN)/uv pip compile pyproject.toml - --extra dev --upgrade \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
		$(if $(wildcard $(FIND_LINKS)),--find-links $(FIND_LINKS)) \
		--custom-compile-command 'make lock' -o $(LOCK)
