#!/usr/bin/env bash
# Download, on the development machine, the wheels that benchmarks/gpu_check.sh installs on the GPU machine
# (which has no network) into .whl/ — then carry them: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"]).
#
# The device image: Python 3.12, torch 2.11 (CUDA 13), triton 3.6, no xformers (benchmarks/README.md). What it
# lacks, for the xformers path of the model (incrementer_fast/attention.py):
#   xformers==0.0.35  one py39-none-manylinux_2_28_x86_64 wheel (any Python ≥ 3.9); Requires-Dist torch>=2.10
#                     and numpy, both on the image. Its attention operators on Hopper are PyTorch's own kernels;
#                     its optional C++ extension (_C.so) links CUDA 12's runtime, libcudart.so.12:
#   nvidia-cuda-runtime-cu12==12.8.90  that runtime, into .whl/cudart12/ (gpu_check.sh unpacks only the .so, so
#                     the wheel's nvidia/ package cannot shadow the image's CUDA 13 ones).
# Both are fetched without their dependencies (--no-deps) as binaries for the device's platform, whatever this
# machine is. The folder is git-ignored through .git/info/exclude (added here if missing).
#
#     bash benchmarks/fetch_device_wheels.sh          # → .whl/xformers-*.whl, .whl/cudart12/*.whl (≈ 4.3 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
XFORMERS_VERSION="${XFORMERS_VERSION:-0.0.35}"
CUDART_VERSION="${CUDART_VERSION:-12.8.90}"

exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

platform=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mkdir -p .whl/cudart12
"$PY" -m pip download -q "${platform[@]}" -d .whl "xformers==$XFORMERS_VERSION"
"$PY" -m pip download -q "${platform[@]}" -d .whl/cudart12 "nvidia-cuda-runtime-cu12==$CUDART_VERSION"

# One version of each: two xformers wheels would make the device's `pip install .whl/*.whl` refuse both.
count=$(find .whl -maxdepth 1 -name 'xformers-*.whl' | wc -l)
if [ "$count" != 1 ]; then
  echo "expected one xformers wheel in .whl/, found $count: remove the stale ones" >&2
  exit 1
fi
for wheel in .whl/xformers-*.whl; do
  echo "$wheel: $(unzip -p "$wheel" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | tr '\n' ' ')"
done
du -sh .whl
