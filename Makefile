# Everyday commands. `make help` lists them.
PY ?= .venv/bin/python

.PHONY: help setup model sample test lint format typecheck check bench cluster cluster-down ci manifests

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup:  ## create .venv, install the project with its dev tools, prepare the embedding model
	bash scripts/setup.sh

model:  ## prepare the embedding model in the cache (no network needed)
	$(PY) -m importer model prepare

sample:  ## import the bundled sample conversations into an embedded Qdrant and search them
	bash scripts/quickstart.sh

test:  ## run the whole test suite (builds and starts the local control plane)
	bash scripts/test.sh

lint:  ## ruff lint and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:  ## apply ruff's formatting and safe fixes
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

typecheck:  ## mypy
	$(PY) -m mypy

check: lint typecheck  ## lint and type-check

bench:  ## run the benchmarks (prints numbers; retrieval needs ../shared/corpus/real-eval)
	$(PY) bench/importer_bench.py
	$(PY) bench/session_settings_bench.py
	$(PY) bench/operator_bench.py
	$(PY) bench/store_bench.py
	$(PY) bench/memory_bench.py
	$(PY) bench/retrieval_bench.py

cluster:  ## start the control plane and a real node (kubelet, containerd; images built) and print the KUBECONFIG
	$(PY) -m localcluster up

cluster-down:  ## stop the node and the control plane, undo the node's host changes
	$(PY) -m localcluster down

manifests:  ## re-render manifests/ from the Helm chart
	$(PY) scripts/render_manifests.py

ci:  ## what CI runs
	bash .ci/run
