#!/usr/bin/env bash
# The qwen_math recipe's DPO step on one GPU, no hub (at most ~8 minutes on one H200): tokens/s, MFU, peak memory.
#   bash scripts/gpu_check.sh [--sizes 0.5b,1.5b] [--steps 6] [--json rows.json]
#   bash scripts/gpu_check.sh --dry        # on CPU in seconds: checks that the script runs
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 python scripts/gpu_check.py "$@"
