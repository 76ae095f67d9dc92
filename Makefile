# Set-up and checks. Two commands on a fresh machine:
#   make demo   creates .venv, installs the package, generates demo.png with the built-in tiny checkpoint
#   make test   creates .venv, installs the package with its dev tools, runs ruff, mypy and the CPU tests
# and `make docs` builds the documentation site into site/ (mkdocs build --strict: any warning fails it).
#
# torch is installed first, pinned, so that pip does not pull a multi-GB CUDA build to satisfy "torch>=2.7"
# on a CPU-only machine. On a machine with a GPU, choose the build you want, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: demo test lint typecheck unit gpu-test bench-full clean test-min-versions docs

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

$(VENV)/.installed-docs: pyproject.toml | $(BIN)/python
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[docs]"
	touch $@ $(VENV)/.installed-base

demo: $(VENV)/.installed-base
	$(BIN)/zimage-turbo demo -o demo.png

test: $(VENV)/.installed-dev lint typecheck unit

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy src

unit: $(VENV)/.installed-dev
	$(BIN)/pytest -q

# The site: the pages under docs/, the README, changelog and security policy, the example notebook and the API
# reference from the docstrings (mkdocs.yml). --strict: a broken link, a docstring griffe cannot parse or a
# cross-reference to nothing fails the build. NO_MKDOCS_2_WARNING hides mkdocs-material's notice about its
# own end of life, printed on every build (see docs/development.md).
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# On a machine with a CUDA GPU (the GPU tests skip elsewhere).
gpu-test: $(VENV)/.installed-dev
	$(BIN)/pytest -q -m gpu tests/gpu

# The CPU tests against the lowest versions pyproject.toml declares (ci/min-versions.txt), in a venv of their
# own, made afresh each time (about 20 minutes on two cores). PyPI has no CPU build of torch 2.7, so this
# downloads its CUDA build (about 3 GB with the NVIDIA libraries; it runs on the CPU all the same). Not in CI
# yet: see docs/development.md, "Minimum versions", for the tests that still fail on those versions.
# Also worth running with the lowest Python supported, e.g. make test-min-versions PYTHON=python3.10
MIN_VENV ?= .venv-min

test-min-versions:
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q --upgrade pip
	$(MIN_VENV)/bin/python -m pip install -q -c ci/min-versions.txt torch
	$(MIN_VENV)/bin/python -m pip install -q -c ci/min-versions.txt -e ".[dev]"
	$(MIN_VENV)/bin/python -m pip list --format=freeze | grep -i -E '^(torch|diffusers|transformers|accelerate)=='
	$(MIN_VENV)/bin/pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) $(MIN_VENV) .pytest_cache .mypy_cache .ruff_cache demo.png site
