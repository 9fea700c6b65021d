#!/usr/bin/env bash
# One-command GPU check (README "Running at full scale"): every trainer a few steps at real size in mixed
# precision, sampling speed vs the ratio of network evaluations, two processes over NCCL with 2 GPUs.
# Prints one table; exits non-zero on any failure. --cpu-smoke: the same at tiny sizes on the CPU.
#   tools/gpu_check.sh [--cpu-smoke] [--steps N] [--precision bf16|fp16] [--workdir DIR] [--keep]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}" MPLBACKEND=Agg
exec "$python" "$root/tools/gpu_check.py" "$@"
