#!/usr/bin/env bash
# The GPU check, one command, for a machine with a CUDA GPU and no network (Python 3.12,
# torch 2.11+CUDA, Triton 3.6, nvcc, pytest, pytest-xdist, pytest-benchmark):
#
#   FASTL2R_DATA=<data root holding fashion-mnist/> [GPU_CHECK_SECONDS=420] [OUT=<folder>] \
#       bash benchmarks/gpu_check.sh [STAGE ...]
#
# Stages, in order (default: all): build tests bench counts exp1 capture, under one deadline of
# GPU_CHECK_SECONDS (default 420) counted from the start; a stage that no longer fits is skipped
# and named in summary.txt.  Everything lands in runs/gpu-check-DATE/ and is packed into at most
# four files in $OUT (else in that folder): summary.txt, ratio_table.md, gpu-check-logs.tar.gz and
# environment.txt.  The stage logic is benchmarks/gpu_check.py; its docstring has the details.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
