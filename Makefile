# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv from requirements.lock (requirements-gpu.lock where nvidia-smi
# finds a GPU) on first use.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
LOCK := $(shell nvidia-smi -L >/dev/null 2>&1 && echo requirements-gpu.lock || echo requirements.lock)
STAMP := $(VENV)/.installed-$(LOCK)

.PHONY: install demo hillstrom test lint typecheck unit serve clean

install: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"
	$(BIN)/uv pip install --python $(BIN)/python -r $(LOCK)
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(BIN)/couponflow demo

hillstrom: install
	$(BIN)/couponflow hillstrom

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -m "not slow" -q

test: lint typecheck
	$(BIN)/pytest -q -ra --durations=15

serve: install
	$(BIN)/couponflow serve

clean:
	rm -rf .couponflow
