#!/usr/bin/env bash
# The seed project's scripts/eval_lora.sh: the LoRA student at several step counts against the 30-step CFG
# baseline (time/image, speed-up, CLIPScore and its retention, LPIPS; optional FID).
# A thin wrapper over `distill flash eval`; every option of that command is accepted, in the seed's spelling or the
# dashed one, and --steps takes the seed's quoted list. Examples:
#   scripts/eval_lora.sh --lora_path checkpoints/flash-lora/lora/final --prompt "a raccoon reading a book" --steps "2 4 8"
#   scripts/eval_lora.sh --preset demo --lora_path checkpoints/flash-lora/lora/final   # 20 demo prompts x 10 images
# Python: $DISTILL_PYTHON, else the repository's .venv, else python3 on PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${DISTILL_PYTHON:-}" ]]; then PY="$DISTILL_PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi
exec "$PY" -m distill_common.cli flash eval "$@"
