# Two commands do everything on a fresh machine (README): `make demo` and `make test`.
# They create .venv, install torch (TORCH_SPEC, only if the venv has none), then ditkern with its test extras.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.ditkern-installed

.PHONY: setup demo test bench bench-quick info clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.cuh csrc/*/*.cu csrc/*/*.cuh csrc/*/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m ditkern demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m bench.run

bench-quick: setup
	$(BIN)/python -m bench.run --quick

info: setup
	$(BIN)/python -m ditkern info

clean:
	rm -rf build *.egg-info ditkern/_C*.so .pytest_cache .benchmarks
