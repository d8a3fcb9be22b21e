# Two commands set up and run everything (see README):
#   make demo   builds into .venv and runs `python -m fastcore_ai demo`
#   make test   builds into .venv, runs pytest and the native (ASan/UBSan) tests
# and, on a GPU machine where nothing can be downloaded:
#   make gpu-check
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
NATIVE_BUILD := build-native

.PHONY: demo test install lint format native-test pytest gpu-check gpu-check-dry bench clean fuzz

$(PY):
	$(PYTHON) -m venv $(VENV)

# Build requirements come from pyproject.toml's [build-system] (one list); --no-build-isolation
# then builds against the torch in .venv instead of a second, throwaway one.
$(VENV)/.build-deps: pyproject.toml | $(PY)
	$(PY) -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires']))" > $(VENV)/build-requirements.txt
	$(PY) -m pip install -q -r $(VENV)/build-requirements.txt
	touch $@

install: $(VENV)/.build-deps
	MAX_JOBS=$${MAX_JOBS:-$(JOBS)} $(PY) -m pip install -q --no-build-isolation -e ".[test]"

demo: install
	$(PY) -m fastcore_ai demo

native-test:
	cmake -S . -B $(NATIVE_BUILD) -DFASTCORE_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug > /dev/null
	cmake --build $(NATIVE_BUILD) -j $(JOBS)
	ctest --test-dir $(NATIVE_BUILD) --output-on-failure

PY_SOURCES := python triton_kernels tests benchmarks examples setup.py
CXX_SOURCES = $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu')

# ruff (lint rules and format in pyproject.toml) and clang-format (.clang-format) over everything we write;
# `make format` applies both.
lint: install
	$(PY) -m ruff check $(PY_SOURCES)
	$(PY) -m ruff format --check $(PY_SOURCES)
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

format: install
	$(PY) -m ruff format $(PY_SOURCES)
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

pytest: install
	$(PY) -m pytest tests -q

test: install lint native-test pytest

# The long fuzzing profile (tests/test_fuzz_ops.py; CI runs its bounded, derandomized profile in `pytest`).
fuzz: install
	FASTCORE_FUZZ=long $(PY) -m pytest tests/test_fuzz_ops.py -q

bench: install
	$(PY) -m fastcore_ai bench

gpu-check:
	bash benchmarks/gpu_check.sh

# The same script's plumbing without a GPU (CPU stand-ins for every step; tests/test_gpu_check_dry.py).
gpu-check-dry: install
	GPU_CHECK_DRY=1 PYTHON=$(abspath $(PY)) OUT=$${OUT:-./gpu-check-dry-out} bash benchmarks/gpu_check.sh

clean:
	rm -rf build $(NATIVE_BUILD) python/fastcore_ai/*.so *.egg-info python/*.egg-info
