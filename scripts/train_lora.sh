#!/usr/bin/env bash
# The seed project's scripts/train_lora.sh: distil a LoRA student from the base model's CFG predictions.
# A thin wrapper over `distill flash train`; every option of that command is accepted, in the seed's spelling
# (--grad_accum, --max_train_steps, --train_batch_size, --output_dir, ...) or the dashed one. Example:
#   scripts/train_lora.sh --base_model ~/models/sd15 --dataset_name lambdalabs/pokemon-blip-captions \
#       --grad_accum 4 --max_train_steps 2000 --output_dir ./checkpoints
# Python: $DISTILL_PYTHON, else the repository's .venv, else python3 on PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${DISTILL_PYTHON:-}" ]]; then PY="$DISTILL_PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi
exec "$PY" -m distill_common.cli flash train "$@"
