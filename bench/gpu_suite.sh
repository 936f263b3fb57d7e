#!/usr/bin/env bash
# The GPU suite on one H100-class GPU, under 10 minutes: SD 1.5 / SDXL inference ours vs diffusers (eager and
# compiled), U-Net training samples/s and MFU, SDXL LoRA step memory. See bench/gpu_suite.py for what each row is.
#
#   bench/gpu_suite.sh            # print the tables
#   bench/gpu_suite.sh --record   # and append them to bench/RESULTS.md
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# the suite's own limit: a run that would take longer than the budget stops instead of eating the next job's time
exec timeout 600 python bench/gpu_suite.py --size full --device cuda "$@"
