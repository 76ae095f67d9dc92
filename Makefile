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

# The CPU tests against the lowest versions pyproject.toml declares, in a venv of their own made afresh each time,
# in two passes (docs/development.md, "Minimum versions"):
#   1. the package with its modelscope, ray and bench extras at their floors (ci/min-versions.txt) and without
#      the quant extra (torchao is removed again after the dev extra brings it): the whole suite, where the
#      tests marked `quant` that quantize skip, as the library refuses quantization without torchao;
#   2. the quant extra's floors (ci/min-versions-quant.txt: its own torch and torchao) installed over it: the
#      tests marked `quant`.
# PyPI has no CPU build of torch, so this downloads the CUDA builds of both torch releases (about 3 GB each with
# their NVIDIA libraries; the CPU tests never load them). About 30 minutes on two cores, most of it the suite.
# Also worth running with the lowest Python supported, e.g. make test-min-versions PYTHON=python3.10
MIN_VENV ?= .venv-min
MIN_PIP := $(MIN_VENV)/bin/python -m pip install -q
MIN_SHOW := $(MIN_VENV)/bin/python -m pip list --format=freeze | grep -i -E '^(torch|torchao|diffusers|transformers|accelerate|modelscope|ray|matplotlib|numpy)=='

test-min-versions:
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_PIP) --upgrade pip
	$(MIN_PIP) -c ci/min-versions.txt torch
	$(MIN_PIP) -c ci/min-versions.txt -e ".[dev]"
	$(MIN_VENV)/bin/python -m pip uninstall -q -y torchao
	$(MIN_SHOW)
	$(MIN_VENV)/bin/pytest -q -p no:cacheprovider
	$(MIN_PIP) -c ci/min-versions-quant.txt torch torchao
	$(MIN_SHOW)
	$(MIN_VENV)/bin/pytest -q -p no:cacheprovider -m quant

clean:
	rm -rf $(VENV) $(MIN_VENV) .pytest_cache .mypy_cache .ruff_cache demo.png site
