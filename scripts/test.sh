#!/usr/bin/env bash
# Run the whole test suite: sets up the project, builds the local Kubernetes control plane, kubelet,
# kube-proxy and the two images once (cached in ~/.cache/reflection-operator), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m localcluster build >/dev/null
exec .venv/bin/python -m pytest "$@"
