#!/usr/bin/env bash
# GPU readiness: every CUDA path of trickbench in a few minutes, offline (synthetic data).
# Writes results/gpu-<device name>/selfcheck.json and report.md (the machine named in it);
# exit 1 if a check failed. Without CUDA it runs the reduced CPU version into results/cpu-<name>/.
#   bash scripts/gpu_check.sh                 # then commit results/gpu-<name>/
#   bash scripts/gpu_check.sh --out DIR
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
"$PY" -c "import bench" 2>/dev/null || bash .ci/setup
device=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
[ "$device" = cuda ] || echo "no CUDA device visible: running the reduced CPU checks (CUDA-only checks are skipped)"
exec timeout 900 "$PY" -m bench selfcheck --device "$device" "$@"
