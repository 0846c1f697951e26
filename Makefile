# The README's two commands. Both create .venv themselves; nothing else needs installing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= out/demo

.PHONY: demo test

$(BIN)/fedtune: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

demo: $(BIN)/fedtune
	$(BIN)/fedtune demo --out $(DEMO_DIR)

test: $(BIN)/fedtune
	$(BIN)/python -m pytest
