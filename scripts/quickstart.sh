#!/usr/bin/env bash
# Set up, import the bundled sample conversations into an embedded Qdrant, then search them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SOURCE=${SOURCE:-examples/sample-projects}
OUT=${OUT:-.state/sample}
mkdir -p "$OUT"
.venv/bin/python -m importer run --source "$SOURCE" --qdrant-path "$OUT/qdrant" --state-file "$OUT/state.json"
echo
echo "Search: .venv/bin/python -m importer search --qdrant-path $OUT/qdrant \"your question\""
.venv/bin/python -m importer search --qdrant-path "$OUT/qdrant" --limit 3 "retry the job when the pod runs out of memory"
