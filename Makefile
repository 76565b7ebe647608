# Quick start targets: each creates .venv and installs what it needs on a fresh clone.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here (not in pyproject) so a CPU machine gets the CPU build; GPU users keep theirs.
TORCH_PIN ?= torch==2.13.0
TRITON_PIN ?= triton==3.8.0

.PHONY: setup compare test info bench fuzz-long clean

$(BIN)/mojo-opset: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q "$(TRITON_PIN)" -e ".[dev]"
	touch $@

setup: $(BIN)/mojo-opset

compare: setup  ## accuracy-compare every available backend against the reference
	$(BIN)/mojo-opset compare $(ARGS)

test: setup  ## the test suite (Triton kernels run in the interpreter on CPU)
	$(BIN)/python -m pytest -q $(ARGS)

info: setup
	$(BIN)/mojo-opset info

bench: setup
	$(BIN)/mojo-opset bench $(ARGS)

fuzz-long: setup  ## the long fuzz profile in parallel shards (docs/fuzzing.md), e.g. ARGS="--shards 6"
	$(BIN)/python tests/fuzz/long_run.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
