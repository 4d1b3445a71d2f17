#!/usr/bin/env bash
# The GPU check, one command, for a machine with a CUDA GPU and no network (Python 3.12,
# torch 2.11+CUDA, Triton 3.6, nvcc; ncu optional):
#
#   FASTL2R_DATA=/path/to/data bash benchmarks/gpu_check.sh [STAGE ...]
#
# Stages, in order (default: all): env build tests bench counts exp1
#   env     versions, nvidia-smi                       -> env.txt
#   build   the C++ and CUDA extensions (FASTL2R_BUILD_CUDA=1, offline pip) -> build.log
#   tests   every test with a CUDA case (pytest -m cuda) -> tests.log, tests.xml
#   bench   pytest benchmarks/ --benchmark-only on the GPU, then the ratio table
#           -> bench.json, bench.log, ratio_table.md   (BENCH_SELECT=-k expression, default "cuda")
#   counts  operator dispatches per update / inner step on CUDA -> dispatch_counts.md
#   exp1    a timed `exp1 --suite fmnist --preset quick --device cuda`, shortened with --set
#           (EXP1_EPISODES meta-training episodes, default 4; one run; ours and sgd) -> exp1.log, exp1/
# Everything goes into one folder, $OUT if set, else runs/gpu-check-DATE; summary.txt
# collects the figures to copy into BENCHMARKS.md.
#
# Fashion-MNIST must be carried to the machine (exp1 and the short-episode benchmark read it):
# FASTL2R_DATA is a data root holding fashion-mnist/ with the four idx .gz files (e.g. a copy of
# Debian's /usr/share/datasets/fashion-mnist/), or the parsed cache fashion_mnist.pt.
#
# Stops at the first error (a failed build, test, benchmark or run); skipped benchmarks and
# tests are not errors.  Stages can run in separate calls on the same machine: `build` leaves
# the extension in place for the others.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-runs/gpu-check-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(env build tests bench counts exp1)
for stage in "${stages[@]}"; do
    case "$stage" in env|build|tests|bench|counts|exp1) ;;
        *) echo "gpu_check: unknown stage '$stage'; stages: env build tests bench counts exp1" >&2; exit 2 ;;
    esac
done

note() { echo "$*" | tee -a "$out/summary.txt"; }
fail() { echo "gpu_check: $*" >&2; exit 1; }
timed() {  # timed NAME LOG COMMAND...: run, log, record the wall time; stop on failure
    local name=$1 log=$2 start status
    shift 2
    start=$(date +%s)
    set +e
    "$@" 2>&1 | tee "$out/$log"
    status=${PIPESTATUS[0]}
    set -e
    note "$name: exit $status, $(( $(date +%s) - start )) s ($*)"
    [ "$status" -eq 0 ] || fail "$name failed (exit $status); see $out/$log"
}

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || fail "torch sees no CUDA GPU on this machine; run this on a GPU machine"
data="${FASTL2R_DATA:-}"
if [ -z "$data" ] || { [ ! -f "$data/fashion_mnist.pt" ] && [ ! -f "$data/fashion-mnist/train-images-idx3-ubyte.gz" ]; }; then
    echo "gpu_check: set FASTL2R_DATA to a data root holding fashion-mnist/ (the four idx .gz files, e.g. a copy" \
         "of /usr/share/datasets/fashion-mnist/) or fashion_mnist.pt; got '${data}'" >&2
    exit 2
fi
export FASTL2R_DATA="$(cd "$data" && pwd)"
note "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), stages: ${stages[*]}, output: $out"

for stage in "${stages[@]}"; do
    case "$stage" in
    env)
        { python -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('gpu', torch.cuda.get_device_name())"
          python -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"
          nvcc --version | tail -n 2 || echo "nvcc: not found"
          command -v ncu >/dev/null && ncu --version | tail -n 1 || echo "ncu: not found"
          nvidia-smi || echo "nvidia-smi: failed"
          git rev-parse HEAD 2>/dev/null || true
        } > "$out/env.txt" 2>&1
        note "env: $(head -n 4 "$out/env.txt" | tr '\n' ';')"
        ;;
    build)
        timed build build.log env FASTL2R_BUILD_CUDA=1 \
            python -m pip install --no-index --no-deps --no-build-isolation -v -e .
        python -c "import fastl2r._C, fastl2r._C_cuda" || fail "the extension was built but does not import"
        ;;
    tests)
        timed tests tests.log python -m pytest tests/ -m cuda -q -rs --junitxml "$out/tests.xml"
        note "tests: $(tail -n 1 "$out/tests.log")"
        ;;
    bench)
        python -c "import pytest_benchmark" 2>/dev/null \
            || fail "pytest-benchmark is not installed here; install it (e.g. from a wheel) and re-run"
        timed bench bench.log python -m pytest benchmarks/ --benchmark-only -q -rs -k "${BENCH_SELECT:-cuda}" \
            --benchmark-json "$out/bench.json"
        python -m benchmarks.ratio_table "$out/bench.json" --out "$out/ratio_table.md" | tee -a "$out/summary.txt"
        ;;
    counts)
        timed counts dispatch_counts.log python -m benchmarks.dispatch_counts --device cuda
        cp "$out/dispatch_counts.log" "$out/dispatch_counts.md"
        cat "$out/dispatch_counts.md" >> "$out/summary.txt"
        ;;
    exp1)
        timed exp1 exp1.log python -m fastl2r.train exp1 --suite fmnist --preset quick --device cuda --runs 1 \
            --methods ours,sgd --no-progress --out "$out/exp1" --set "metatrain.episodes=${EXP1_EPISODES:-4}"
        python - "$out/exp1" <<'EOF' | tee -a "$out/summary.txt"
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
results = json.loads((run / "results.json").read_text())
print(f"exp1 quick (fmnist, 1 run): {results.get('seconds')} s in all")
trained = run / "metatrain.json"
if trained.exists():
    p = json.loads(trained.read_text())
    print(f"meta-training: {p['inner_steps']} inner steps in {p['seconds']:.1f} s = "
          f"{p['inner_steps'] / max(p['seconds'], 1e-9):.2f} inner steps/s")
EOF
        ;;
    esac
done
note "gpu_check: done; figures in $out/summary.txt"
