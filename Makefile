# Quick start targets: each creates .venv and installs what it needs on a fresh clone.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here (not in pyproject) so a CPU machine gets the CPU build; GPU users keep theirs.
TORCH_PIN ?= torch==2.13.0
# Triton of .venv, inside the range pyproject.toml declares (triton>=3.6); compare-oldest and
# compare-newest check the range's ends
TRITON_VERSION ?= 3.8.0
TRITON_OLDEST ?= 3.6.0
TRITON_NEWEST ?= 3.9.0
# the Triton interpreter of 3.6 and 3.7 needs numpy < 2.3
NUMPY_PIN = $(if $(filter 3.6.% 3.7.%,$(TRITON_VERSION)),numpy<2.3,numpy)

.PHONY: setup compare compare-oldest compare-newest test info bench fuzz-long clean

$(BIN)/mojo-opset: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q "triton==$(TRITON_VERSION)" "$(NUMPY_PIN)" -e ".[dev]"
	touch $@

setup: $(BIN)/mojo-opset

compare: setup  ## accuracy-compare every available backend against the reference
	$(BIN)/mojo-opset compare $(ARGS)

compare-triton-%:  ## compare with another Triton release in its own .venv-triton-<version>
	$(MAKE) compare VENV=.venv-triton-$* TRITON_VERSION=$*

compare-oldest: compare-triton-$(TRITON_OLDEST)
compare-newest: compare-triton-$(TRITON_NEWEST)

test: setup  ## the test suite (Triton kernels run in the interpreter on CPU)
	$(BIN)/python -m pytest -q $(ARGS)

info: setup
	$(BIN)/mojo-opset info

bench: setup
	$(BIN)/mojo-opset bench $(ARGS)

fuzz-long: setup  ## the long fuzz profile in parallel shards (docs/fuzzing.md), e.g. ARGS="--shards 6"
	$(BIN)/python tests/fuzz/long_run.py $(ARGS)

clean:
	rm -rf $(VENV) .venv-triton-* build *.egg-info
