# kdep-cache: the table of contents. `make demo` and `make test` are the two commands a new user needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MANIFEST ?= manifests/demo.yaml
KDEP := $(BIN)/kdep
PYTEST_ARGS ?=

.PHONY: install test test-all demo demo-data cache-teacher fit-svd train-student eval bench study study-layers lint format clean

install: $(STAMP)  ## venv + the project (editable) with dev extras; fast when already done

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: install  ## the fast suite (every stage end to end on tiny data)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: install  ## everything, slow tests included
	$(BIN)/python -m pytest -q -m 'not gpu' $(PYTEST_ARGS)

demo: install  ## the whole pipeline on the embedded demo data, on CPU
	$(KDEP) demo --manifest $(MANIFEST)

demo-data: install  ## just the demo shards
	$(KDEP) demo-data --manifest $(MANIFEST)

cache-teacher: install  ## stage 1: teacher features for K views per image -> Zarr cache
	$(KDEP) cache-teacher --manifest $(MANIFEST)

fit-svd: install  ## stage 2: projections from the cache
	$(KDEP) fit-svd --manifest $(MANIFEST)

train-student: install  ## stage 3: students from shards + cache
	$(KDEP) train-student --manifest $(MANIFEST)

eval: install  ## linear probe / k-NN / agreement
	$(KDEP) eval --manifest $(MANIFEST)

bench: install  ## benchmark ratios -> benchmarks/results/ (QUICK=1 for the short profile)
	$(KDEP) bench $(if $(QUICK),--quick,) $(if $(DEVICE),--device $(DEVICE),)

study: install  ## views study: students on k cached views vs online KD on fresh views, 5 paired seeds (CPU, < 60 min)
	$(KDEP) study views --manifest manifests/study-views.yaml

study-layers: install  ## layers study: single-tap vs multi-layer KDEP vs DistPro, 3 seeds each (CPU, about an hour)
	$(KDEP) study layers --manifest manifests/study-layers.yaml

lint: install
	$(BIN)/ruff check pipeline stages tests benchmarks studies
	$(BIN)/ruff format --check pipeline stages tests benchmarks studies

format: install
	$(BIN)/ruff format pipeline stages tests benchmarks studies
	$(BIN)/ruff check --fix pipeline stages tests benchmarks studies

clean:  ## generated outputs (the venv stays; `rm -rf .venv` for a fresh install)
	rm -rf out .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
