# Two commands: `make train` and `make test`. Each builds .venv here first if it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch on machines without a GPU; set TORCH_SPEC=torch for your platform's default.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: train test parity bench lint report gpu-check clean metal-resolve

$(VENV)/.core: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.full: $(VENV)/.core
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[torch,dev]"
	touch $@

train: $(VENV)/.core
	$(PY) train.py $(ARGS)

# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
test: $(VENV)/.full metal-resolve
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; exit 1; fi; exit $$rc

# The metal extra resolved for macOS 14 on Apple silicon, as recorded in tests/metal_resolution.txt (offline): fails
# without jax-mps and a jax it takes, or when pyproject.toml no longer admits a recorded pin.
metal-resolve: $(VENV)/.full
	$(PY) tests/check_metal_resolution.py

# Resolve the metal extra again with uv against PyPI and record it (network; not part of make test or CI).
.PHONY: metal-refresh
metal-refresh: $(VENV)/.full
	$(PY) tests/check_metal_resolution.py --refresh

parity: $(VENV)/.full
	$(PY) -m pytest -q -p no:cacheprovider parity_tests

report: $(VENV)/.full
	$(PY) -m parity_tests.report

bench: $(VENV)/.full
	$(PY) benchmarks/bench_train.py $(ARGS)

# On a CUDA machine: the GPU proof in one go (parity on the GPU, cuDNN vs XLA attention, bench_train, 30 gpt2
# steps) into gpu_check.json. It installs the cuda extra and your platform's torch into .venv; GPU_PY=python3
# uses a Python that already has them (a machine without network). `ARGS=--dry` checks it on the CPU.
GPU_PY ?= $(PY)
gpu-check:
ifeq ($(GPU_PY),$(PY))
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch -e ".[cuda,torch,dev]"
endif
	$(GPU_PY) benchmarks/gpu_check.py --out gpu_check.json $(ARGS)

lint: $(VENV)/.full
	$(PY) -m ruff check flax_gpt torch_ref parity_tests tests benchmarks train.py

clean:
	rm -rf $(VENV) .pytest_cache
