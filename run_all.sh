#!/usr/bin/env bash
# Run every matrix in ablations/ with the profile that fits this machine, then rebuild the
# reports. With a CUDA device: the full matrices. Without: each matrix's `cpu` profile.
# Finished runs are kept: running this again resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")"

PY=.venv/bin/python
"$PY" -c "import bench" 2>/dev/null || bash .ci/setup  # first run on a fresh machine: install

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  profile_args=(); echo "CUDA device found: running the full matrices"
else
  profile_args=(--profile cpu); echo "no CUDA device: running each matrix's cpu profile"
fi

status=0
for matrix in ablations/*.yaml; do
  echo "== $matrix"
  "$PY" -m bench run "$matrix" "${profile_args[@]}" || status=$?
done

for dir in results/*/; do
  [ -f "$dir/cells.jsonl" ] && "$PY" -m bench report "$dir"
done
"$PY" -m bench index results
exit $status
