# make test   build (with CUDA when nvcc is found) and run the test suite
# make bench  build and run the benchmark suite against PyTorch native / cuDNN
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MAX_JOBS ?= 2
BENCH_ARGS ?=

.PHONY: build test bench clean

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

build: $(VENV)/.deps
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest tests -q

bench: build
	$(PY) -m pip install -q matplotlib
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf build torch_bnext/*.so *.egg-info
