# Two commands on a fresh machine:  `make repro` (set up + run the embedded default pipeline), `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip must take the locked, hash-checked wheels from the package index, not a local CPU-only torch wheel that
# some machines configure through PIP_FIND_LINKS (its torchvision would not load).
PIP := env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(BIN)/python -m pip

.PHONY: setup repro test test-all rehearse gpu-check lock clean-state

$(BIN)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q --require-hashes -r requirements.lock
	$(PIP) install -q --no-deps -e .
	$(BIN)/dvc config --local core.analytics false 2>/dev/null || true
	touch $@

setup: $(BIN)/.installed  ## create .venv with the locked dependencies and dmae installed

repro: setup  ## run the whole pipeline on the embedded default (digits), as DVC caches it
	. $(BIN)/activate && dvc repro

test: setup  ## the test suite (fast tests; slow ones with `make test-all`)
	. $(BIN)/activate && python -m pytest -q

test-all: setup  ## every test, the slow ones included: end-to-end runs and a rehearsal of every preset
	. $(BIN)/activate && python -m pytest -q -m "slow or not slow"

PRESET ?= imagenet-nim-vit-b
NPROC ?=
rehearse: setup  ## run PRESET's whole DAG at toy sizes in a temporary copy (`make rehearse PRESET=... NPROC=2`)
	. $(BIN)/activate && dmae rehearse $(PRESET) $(if $(NPROC),--nproc $(NPROC))

# On a machine with a CUDA GPU (the lent device has torch, timm, scipy, safetensors and rich in its python3;
# pydantic-settings and typer must be installed there, e.g. from carried wheels): figures to gpu-check.md / .json
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:  ## every CUDA path the paper scale relies on, once, sized for < 8 minutes (tools/gpu_check.py)
	$(GPU_PYTHON) -m tools.gpu_check --out gpu-check

lock:  ## re-resolve requirements.lock from pyproject.toml (needs the package index; uv: `pip install uv`)
	uv pip compile pyproject.toml --extra test --generate-hashes -c constraints.txt --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 -o requirements.lock

clean-state:  ## forget interrupted-run checkpoints (.dmae-state/)
	rm -rf .dmae-state
