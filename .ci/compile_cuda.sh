#!/usr/bin/env bash
# CI: compile every CUDA source of csrc/ (csrc/README.md) for sm_90, compile only (CI has no
# GPU), so that a CUDA compile error fails CI even where the CUDA extension is not built.
#  - every op's kernels (csrc/<op>/cuda.cu) with nvcc alone, warnings as errors: they include
#    no torch;
#  - the torch-facing CUDA module (csrc/common/cuda_module.cpp) with nvcc's host compiler
#    against the installed torch's headers (a CPU-only torch ships them, minus one generated
#    CUDA header);
#  - then every fastl2r::cuda entry point the module calls must be defined by the kernels.
# Without nvcc it says so and skips.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvcc >/dev/null 2>&1; then
    echo "compile_cuda: nvcc not found; the CUDA sources were NOT compiled (skipped)"
    exit 0
fi
archs=$(nvcc --list-gpu-arch)
if ! grep -qx compute_90 <<<"$archs"; then
    echo "compile_cuda: this nvcc cannot target sm_90; it lists:" $archs >&2
    exit 1
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

for source in csrc/*/cuda.cu; do
    echo "compile_cuda: nvcc sm_90 $source"
    nvcc -std=c++17 -arch=sm_90 -O3 --Werror all-warnings -c "$source" -o "$out/$(basename "$(dirname "$source")").cu.o"
done

torch_flags=$(python - <<'EOF'
import os, sysconfig
from torch.utils.cpp_extension import include_paths
dirs = include_paths() + [sysconfig.get_paths()["include"]]
flags = [f"-I{d}" for d in dirs]
# CPU builds of torch ship the c10/cuda headers without this generated one.
if not any(os.path.exists(os.path.join(d, "c10/cuda/impl/cuda_cmake_macros.h")) for d in dirs):
    flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
print(" ".join(flags))
EOF
)
source=csrc/common/cuda_module.cpp
echo "compile_cuda: host compiler with torch headers $source"
# shellcheck disable=SC2086  # torch_flags is a list of flags
nvcc -std=c++20 -O0 $torch_flags -c "$source" -o "$out/cuda_module.cpp.o"

# The module's calls into fastl2r::cuda must match the kernels' explicit instantiations,
# else the extension fails to load on a GPU machine with an undefined symbol.
nm --defined-only "$out"/*.cu.o | awk '$2 ~ /^[TW]$/ && $3 ~ /^_ZN7fastl2r/ {print $3}' | sort -u >"$out/defined"
nm --undefined-only "$out"/*.cpp.o | awk '$2 ~ /^_ZN7fastl2r/ {print $2}' | sort -u >"$out/needed"
missing=$(comm -23 "$out/needed" "$out/defined")
if [ -n "$missing" ]; then
    echo "compile_cuda: cuda_module.cpp calls entry points that no cuda.cu defines:" >&2
    echo "$missing" | c++filt >&2
    exit 1
fi
echo "compile_cuda: every CUDA source compiles for sm_90; $(wc -l <"$out/needed") entry points resolved"
