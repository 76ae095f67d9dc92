# Set-up and checks. Two commands on a fresh machine:
#   make demo   creates .venv, installs the package, generates demo.png with the built-in tiny checkpoint
#   make test   creates .venv, installs the package with its dev tools, runs ruff, mypy and the CPU tests
#
# torch is installed first, pinned, so that pip does not pull a multi-GB CUDA build to satisfy "torch>=2.6"
# on a CPU-only machine. On a machine with a GPU, choose the build you want, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: demo test lint typecheck unit gpu-test bench-full clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[dev]"
	touch $@ $(VENV)/.installed-base

demo: $(VENV)/.installed-base
	$(BIN)/zimage-turbo demo -o demo.png

test: $(VENV)/.installed-dev lint typecheck unit

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy src

unit: $(VENV)/.installed-dev
	$(BIN)/pytest -q

# On a machine with a CUDA GPU (the GPU tests skip elsewhere).
gpu-test: $(VENV)/.installed-dev
	$(BIN)/pytest -q -m gpu tests/gpu

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo.png
