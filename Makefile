# The two set-up commands of the README. Each creates what it needs (a virtual environment in .venv,
# the package built from this clone, the test/train extras, torch for the comparisons) and runs.
#   make demo   the main job: train the MLP on digits (metrics, plot), a demo of the functional API,
#               then the short CPU benchmark
#   make test   the test suite (what CI runs, through .ci/run)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q "setuptools>=64" wheel "Cython>=3.0" "numpy>=1.25"
	$(BIN)/pip install -q --no-build-isolation -e ".[test,train,search,gpu]"
	# torch (CPU build) only for the comparisons with torch.optim; tests skip them without it
	$(BIN)/pip install -q torch==2.13.0 || echo "torch not installed: torch comparisons will be skipped"

demo: install
	$(BIN)/fastopt train
	$(BIN)/python -m fastopt.demo

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/bench_cpu.py

clean:
	rm -rf build $(VENV) *.egg-info kernels/cpu/*.so kernels/cpu/_cpu_fast.cpp
