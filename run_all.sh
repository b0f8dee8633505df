#!/usr/bin/env bash
# Run every matrix in ablations/ with the profile that fits this machine, then rebuild the
# reports. With a CUDA device: the full matrices. Without: each matrix's `cpu` profile.
# Finished runs are kept: running this again resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")"

PY=.venv/bin/python
"$PY" -c "import bench" 2>/dev/null || bash .ci/setup  # first run on a fresh machine: install

gpus=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
profile_for() {  # the profile that fits this machine, for one matrix file
  if [ "$gpus" -eq 0 ]; then echo cpu
  elif [ "$gpus" -eq 1 ] && grep -q '^  gpu1:' "$1"; then echo gpu1  # world_size > 1 needs more GPUs
  fi
}
echo "CUDA devices: $gpus"

# The full matrices train on CIFAR-10. Without it and without a network, matrices that have an
# `offline` profile run it (digits or synthetic data at the same 32x32 size), so the run completes.
offline=""
if [ "$gpus" -gt 0 ] && ! timeout 900 "$PY" -c "import torchvision; torchvision.datasets.CIFAR10('data', download=True)" \
    >/dev/null 2>&1; then
  offline=offline
  echo "CIFAR-10 is not in data/ and cannot be downloaded: matrices with an offline profile use it"
fi
with_offline() {  # $1 = profile (may be empty), $2 = matrix file
  if [ -n "$offline" ] && grep -q '^  offline:' "$2"; then echo "${1:+$1,}offline"; else echo "$1"; fi
}

status=0
for matrix in ablations/*.yaml; do
  profile=$(with_offline "$(profile_for "$matrix")" "$matrix")
  echo "== $matrix ${profile:+(profile $profile)}"
  "$PY" -m bench run "$matrix" ${profile:+--profile "$profile"} || status=$?
done

# Memory vs sequence length of the three attention kernels (vit_tiny): a figure, not a matrix.
"$PY" -m bench attention-memory --out results/attention || status=$?

for dir in results/*/; do
  [ -f "$dir/cells.jsonl" ] && "$PY" -m bench report "$dir"
done
"$PY" -m bench index results
exit $status
