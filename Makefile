# syncbn developer entry points. `make help` lists them; every target installs what it needs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check
ARGS ?=
GPU_PYTHON ?= 3.12

.DEFAULT_GOAL := help
.PHONY: help install test test-fast test-gpu gpu-wheels lint format run check bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned, so pip takes the CPU wheel instead of resolving a multi-GB CUDA build
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[launch,lightning,test,dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install syncbn with launch, lightning, test and dev extras (idempotent)

test: $(STAMP)  ## run the whole test suite (what CI runs)
	$(BIN)/python -m pytest $(ARGS)

test-fast: $(STAMP)  ## only the single-process tests
	$(BIN)/python -m pytest -m "not multiprocess and not slow" $(ARGS)

# No .venv here: the GPU machine's own python3 (PYTHON=...) and its CUDA torch, never reinstalled.
test-gpu:  ## on a CUDA machine: GPU tests, gloo+CUDA and NCCL runs, main job, check, bench -> docs/gpu/
	@$(PYTHON) -m tools.gpu_suite $(ARGS)

gpu-wheels:  ## download the pure-Python needs of test-gpu into .whl/ (GPU_PYTHON=3.12), for offline GPUs
	$(PYTHON) -m tools.gpu_needs --python-version $(GPU_PYTHON) $(ARGS)

lint: $(STAMP)  ## ruff lint + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

run: $(STAMP)  ## train with the default config on 2 local gloo workers (ARGS="overrides ...")
	$(BIN)/python -m launch.run $(ARGS)

check: $(STAMP)  ## distributed self-test: SyncBN vs float64 BatchNorm, all-reduce latency (ARGS=...)
	$(BIN)/python -m launch.run task=check $(ARGS)

bench: $(STAMP)  ## benchmark SyncBN vs local BN + comm vs naive on 2 ranks, 1 thread each (ARGS=...)
	$(BIN)/python -m launch.run task=bench launcher.nproc_per_node=2 timeout_s=3600 $(ARGS)

clean:  ## remove .venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache outputs multirun
