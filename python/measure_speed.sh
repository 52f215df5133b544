#!/usr/bin/env bash
# Measure the fused ops against stock PyTorch on this machine and keep the figures as JSON.
#   bash python/measure_speed.sh [extra `python -m shvit_kernels bench` args, e.g. --batch 2 --reps 3]
set -euo pipefail
python -m shvit_kernels info
python -m shvit_kernels bench --json "${SHVIT_BENCH_JSON:-bench.json}" "$@"
