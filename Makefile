# Two entry points (see README): `make run` and `make test`. Both create .venv on first use and reuse it.
# `make test-fast` is the quick loop: the code, data and model tests, no servers and no `dvc repro`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin

# Stage commands (`tollgate <stage>` in dvc.yaml) must resolve to this venv.
export PATH := $(BIN):$(PATH)
# Offline by default: no telemetry from Prefect, DVC or Great Expectations (MLflow's: pipeline/registry).
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false

.PHONY: run test test-fast bench

$(VENV)/.installed: pyproject.toml tests/clients/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,team,torchserve,onnx]"  # one resolution: see pyproject.toml's team extra
	$(PYTHON) -m venv $(VENV)/clients  # Triton's and KServe's clients, for the tests: see the requirements file
	$(VENV)/clients/bin/python -m pip install -q -r tests/clients/requirements.txt
	touch $@

run: $(VENV)/.installed
	$(BIN)/dvc repro
	$(BIN)/tollgate summary

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/pytest

test-fast: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/pytest -m "not system"

bench: $(VENV)/.installed
	$(BIN)/python bench/repro_timing.py
