#!/usr/bin/env bash
# One prepared GPU check of the nucleus plugin kernels (needs nvcc and PyTorch with CUDA; no TensorRT):
#   1. compile the kernels into build/gpu_check/libnucleus_kernels.so (warnings as errors, sm_80 + sm_90 + this GPU)
#   2. python plugins/gpu_check.py: correctness vs PyTorch at the real sizes, then the timing table.
# Usage: plugins/gpu_check.sh [gpu_check.py options, e.g. --tokens 4096 --iters 50 --skip-layer]
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
PYTHON="${PYTHON:-python3}"
OUT=build/gpu_check
mkdir -p "$OUT"

ARCHS=(-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90)
if command -v nvidia-smi >/dev/null 2>&1; then
  CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d ' .')"
  if [[ -n "$CAP" && "$CAP" != 80 && "$CAP" != 90 ]]; then
    ARCHS+=("-gencode=arch=compute_${CAP},code=sm_${CAP}")
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
"$NVCC" --version | tail -n1

FLAGS=(-std=c++17 -O3 -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror,-fPIC "${ARCHS[@]}")
SOURCES=(plugins/common/nucleusKernelStatus.cu
         plugins/expertChoiceRouterPlugin/expertChoiceRouterKernel.cu
         plugins/moeCombinePlugin/moeCombineKernel.cu)
OBJECTS=()
PIDS=()
for src in "${SOURCES[@]}"; do
  obj="$OUT/$(basename "${src%.cu}").o"
  "$NVCC" "${FLAGS[@]}" -c "$src" -o "$obj" &
  PIDS+=($!)
  OBJECTS+=("$obj")
done
for pid in "${PIDS[@]}"; do
  wait "$pid"  # a failed compile stops the script (set -e)
done
"$NVCC" -shared "${ARCHS[@]}" "${OBJECTS[@]}" -o "$OUT/libnucleus_kernels.so"
# Its checksum, recorded as a bundle manifest records files: gpu_check.py loads the library only if it still matches.
printf '{"files": {"libnucleus_kernels.so": {"sha256": "%s", "bytes": %s}}}\n' \
  "$(sha256sum "$OUT/libnucleus_kernels.so" | cut -d' ' -f1)" "$(stat -c %s "$OUT/libnucleus_kernels.so")" \
  > "$OUT/manifest.json"
echo "built $OUT/libnucleus_kernels.so (sha256 in $OUT/manifest.json)"

exec "$PYTHON" plugins/gpu_check.py --lib "$OUT/libnucleus_kernels.so" "$@"
