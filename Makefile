# Common commands. `make test` and `make demo` create (or reuse) the virtual environment and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp
# torch first, from the local CPU build: a bare `torch` requirement would otherwise pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
export OMP_NUM_THREADS ?= 2

.PHONY: install test test-all demo ablate bench lint format clean

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[dev,dali]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q tests

test-all: install
	$(PY) -m pytest -q tests -m ''

demo: install
	$(PY) -m launcher.demo

ablate: install
	$(PY) -m launcher.ablate --config configs/toy.yaml --seeds 0 1 2

bench: install
	$(PY) -m pytest -q benchmarks --benchmark-only -p no:randomly -o addopts=''

lint: install
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache
