# Two commands do everything on a fresh machine (README): `make demo` and `make test`.
# They create .venv, install torch (TORCH_SPEC, only if the venv has none), then ditkern with its test extras.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.ditkern-installed

.PHONY: setup demo test bench bench-quick bench-e2e info clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.cuh csrc/*/*.cu csrc/*/*.cuh csrc/*/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	@# pip -q hides setup.py's own messages: say here whether the CUDA extension will be compiled (it takes minutes)
	@if [ "$$DITKERN_SKIP_CUDA_BUILD" != 1 ] && { command -v nvcc >/dev/null || [ -x "$$CUDA_HOME/bin/nvcc" ] || [ -x /usr/local/cuda/bin/nvcc ]; }; \
	then echo "ditkern: nvcc found: compiling the CUDA extension ditkern._C during the install (minutes; DITKERN_SKIP_CUDA_BUILD=1 skips it)"; \
	else echo "ditkern: no nvcc (or DITKERN_SKIP_CUDA_BUILD=1): installing without the CUDA extension (Triton + torch backends)"; fi
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

bench-e2e: setup
	$(BIN)/python -m bench.e2e

info: setup
	$(BIN)/python -m ditkern info

clean:
	rm -rf build *.egg-info ditkern/_C*.so .pytest_cache .benchmarks
