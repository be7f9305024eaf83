# Two commands on a fresh machine:  make train  |  make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: setup train test test-fast lint imports docs bench clean

setup: $(STAMP)

# Reuse a torch already importable by python3 (system site-packages); otherwise install
# torch==$(TORCH_VERSION), which on a CPU machine here is the local CPU build (never CUDA).
$(STAMP): pyproject.toml
	@if python3 -c "import torch" 2>/dev/null; then \
		echo "reusing the installed torch"; python3 -m venv --system-site-packages $(VENV); \
	else \
		python3 -m venv $(VENV); \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/paratrain train

# everything: the import layering (pyproject's import-linter contracts), then the whole suite
test: imports
	$(PY) -m pytest tests

# the quick loop (under 2 minutes): no multi-process runs (tests marked slow)
test-fast: imports
	$(PY) -m pytest tests -m "not slow"

imports: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache

lint: imports
	$(VENV)/bin/ruff check paratrain tests benchmarks examples

# docs/config.md is generated from paratrain/config.py
docs: $(STAMP)
	$(PY) -m paratrain.config_docs > docs/config.md

bench: $(STAMP)
	$(PY) benchmarks/trainer_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
