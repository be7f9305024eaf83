# Two commands on a fresh machine:  make train  |  make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: setup train test lint bench clean

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

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check paratrain tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/trainer_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
