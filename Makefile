# All set-up happens here so that a fresh clone needs only `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-all lint bench clean

venv: $(STAMP)

# torch is pinned to the CPU build that lies on local disk (an unpinned torch
# would pull a multi-GB CUDA build); it is installed first so that the
# project's own `torch` range is already satisfied.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev,cluster]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m swiftalign.demo

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
