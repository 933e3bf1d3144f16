# The two set-up commands of the README. Each creates a virtual environment in .venv, builds the package
# from this clone (editable) with what its job needs, and runs:
#   make demo   the main job: train the MLP on digits (metrics, plot), a demo of the functional API, then the
#               short CPU benchmark. Installs the package with [train] only: no GPU wheels, no torch.
#   make test   the test suite (what CI runs, through .ci/run). Installs [test,train,search,gpu] (the GPU
#               compile checks need the NVRTC/NVCC wheels), torch (CPU) for the torch.optim comparisons, and
#               the compilers of the build matrix (clang, aarch64 cross g++) through apt-get on Debian as root.
# Each install is done once (a stamp in .venv, redone when pyproject.toml or setup.py change); the extension
# is rebuilt in place before every run when its sources changed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# incremental: recompiles only when kernels/ changed since the last build
BUILD_EXT := $(BIN)/python setup.py -q build_ext --inplace
BUILD_REQS := "setuptools>=77" wheel "Cython>=3.0" "numpy>=1.25"

.PHONY: demo test bench build-tools clean gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.deps-demo: pyproject.toml setup.py | $(BIN)/python
	$(PIP) install -q $(BUILD_REQS)
	$(PIP) install -q --no-build-isolation -e ".[train]"
	touch $@

$(VENV)/.deps-test: pyproject.toml setup.py | $(BIN)/python
	$(PIP) install -q $(BUILD_REQS)
	$(PIP) install -q --no-build-isolation -e ".[test,train,search,gpu,distributed]"
	# torch (CPU build) only for the comparisons with torch.optim; tests skip them without it
	$(PIP) install -q torch==2.13.0 || echo "torch not installed: torch comparisons will be skipped"
	# expecttest: imported by torch.testing._internal, whose optimizer test database tests/test_torch_optim_db.py runs
	$(PIP) install -q expecttest==0.3.0 || echo "expecttest not installed: the torch optimizer database tests will be skipped"
	# pytorch_optimizer: the oracle for Yogi (tests/test_new_optimizers.py); --no-deps, as its only needs are numpy
	# and torch (above): resolving them itself would pull the CUDA build of a newer torch
	$(PIP) install -q --no-deps pytorch_optimizer==4.1.0 || echo "pytorch_optimizer not installed: the Yogi comparisons will be skipped"
	# schedulefree: the oracle for ScheduleFreeSGD / ScheduleFreeAdamW (tests/test_schedule_free.py); --no-deps for the
	# same reason (it needs torch and typing_extensions, both here); not in the `test` extra, which would resolve torch
	$(PIP) install -q --no-deps schedulefree==1.4.1 || echo "schedulefree not installed: the schedule-free comparisons will be skipped"
	touch $@

# clang (the serial clang build) and the aarch64 cross compiler, for tests/test_build.py. Where they cannot
# be installed the build-matrix tests skip and say why (under CI, where the variable CI is set, they fail).
build-tools: | $(BIN)/python
	@missing=""; \
	command -v clang++ >/dev/null 2>&1 || missing="$$missing clang"; \
	command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || missing="$$missing g++-aarch64-linux-gnu"; \
	if [ -n "$$missing" ]; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			echo "installing$$missing (apt-get, log in $(VENV)/apt.log)"; \
			{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; } \
				>$(VENV)/apt.log 2>&1 || echo "could not install$$missing (see $(VENV)/apt.log)"; \
		else \
			echo "missing$$missing (installed by apt-get when make runs as root on Debian)"; \
		fi; \
	fi

demo: $(VENV)/.deps-demo
	$(BUILD_EXT)
	$(BIN)/fastopt train
	$(BIN)/python -m fastopt.demo

test: $(VENV)/.deps-test build-tools
	$(BUILD_EXT)
	$(BIN)/python -m pytest -q

bench: $(VENV)/.deps-test
	$(BUILD_EXT)
	$(BIN)/python bench/bench_cpu.py

# make gpu-check OUT=<dir> [STAGES=build,tests,sanitizer,bench] [BUDGETS=build=480,...] [GPU_PYTHON=python3]
#                [GPU_CHECK_ARGS="--archive gpu-check.tar.gz"]
# On a GPU machine without network access that already has CUDA, cupy-cuda13x, numba-cuda, torch, pytest, Cython
# and compute-sanitizer: builds the extension in place (beside the rest: the GPU backends do not need it), runs
# tests/gpu (on pytest-xdist workers where installed) beside compute-sanitizer (memcheck, initcheck, racecheck,
# synccheck) on every kernel, then the GPU benchmark alone, each stage with its own time budget (8, 6, 4, 4
# minutes; at most 10 in all), with logs, JSON and OUT/summary.json in OUT (tests/gpu/gpu_check.py). No venv,
# nothing installed.
GPU_PYTHON ?= python3
STAGES ?= build,tests,sanitizer,bench
BUDGETS ?=
GPU_CHECK_ARGS ?=
gpu-check:
	@if [ -z "$(OUT)" ]; then echo "usage: make gpu-check OUT=<dir> [STAGES=build,tests,sanitizer,bench]" >&2; exit 2; fi
	$(GPU_PYTHON) tests/gpu/gpu_check.py --out "$(OUT)" --stages "$(STAGES)" --python "$(GPU_PYTHON)" \
		$(if $(BUDGETS),--budgets "$(BUDGETS)") $(GPU_CHECK_ARGS)

clean:
	rm -rf build $(VENV) *.egg-info kernels/cpu/*.so kernels/cpu/_cpu_fast.cpp
