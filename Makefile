# make test       build (incrementally) and run the test suite (what CI runs)
# make test-fast  the same without the tests marked slow (pytest -m "not slow"), for iteration
# make bench      build (incrementally) and run the benchmark against PyTorch native / cuDNN
# make lint       ruff over the Python, clang-format over csrc/ (CI runs it); make format fixes
#
# The extension compiles CUDA kernels when a GPU is visible, or with BNEXT_CUDA=1
# (CI sets it so they compile on every submission); see setup.py.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MAX_JOBS ?= 2
BENCH_ARGS ?=

.PHONY: build test test-fast bench lint format clean

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "Installing the Python dependencies (requirements-dev.txt) into $(VENV)"
	$(PY) -m pip install --progress-bar off -r requirements-dev.txt
	touch $@

# An in-place build in ./build: ninja recompiles only what changed (an unchanged
# tree costs seconds) and shows its progress. The editable install, made once,
# lets the virtual environment import torch_bnext from this tree.
build: $(VENV)/.deps
	MAX_JOBS=$(MAX_JOBS) $(PY) setup.py build_ext --inplace
	@test -f $(VENV)/.editable || { \
	  echo "Registering the tree in $(VENV) (pip install --no-build-isolation -e .)"; \
	  MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install -q --no-build-isolation --no-deps -e . && \
	  touch $(VENV)/.editable; }

test: build
	$(PY) -m pytest tests -q

# The tests marked slow (an AddressSanitizer build, spawned ranks, long training
# runs) take more than half of the suite's time; `make test` still runs them.
test-fast: build
	$(PY) -m pytest tests -q -m "not slow"

bench: build
	$(PY) benchmarks/run.py $(BENCH_ARGS)

CXX_SOURCES = find csrc \( -name '*.h' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.cu' \)

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(CXX_SOURCES) | xargs $(VENV)/bin/clang-format --dry-run -Werror

format: $(VENV)/.deps
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(CXX_SOURCES) | xargs $(VENV)/bin/clang-format -i

clean:
	rm -rf build torch_bnext/*.so torch_bnext/_build_info.py *.egg-info $(VENV)/.editable
