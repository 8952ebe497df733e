#!/usr/bin/env bash
# The whole GPU verification of incrementer_fast in ONE call, ending within 8 minutes (issue 5).
#
# Run it on a lent GPU machine through the device tool, from the repository root (see benchmarks/README.md):
#
#     run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# `.whl/` (git-ignored through .git/info/exclude) must hold the wheels the device image lacks; prepare it once
# on the development machine — benchmarks/README.md, "Carried wheels":
#     .whl/xformers-0.0.35-py39-none-manylinux_2_28_x86_64.whl            (3.3 MB)
#     .whl/cudart12/nvidia_cuda_runtime_cu12-12.8.90-*.whl               (1.0 MB, optional)
# Without them every stage still runs; the xformers results are then marked "not run (wheel not carried)".
#
# Stages (each boxed by `timeout`, so one hang cannot eat the device time; the budgets add up to ≤ 470 s):
#   setup     ≤ 45 s   install the carried wheels into /tmp/site, this repo (editable, no deps, no network);
#                      versions, nvidia-smi
#   xformers  ≤ 25 s   xformers.ops.memory_efficient_attention forward+backward on CUDA (fp32, bf16) against
#                      SDPA, and the backend the model's attention resolves to
#   tests     ≤ 150 s  pytest tests -m "not slow" -k "$TESTS_K": all of tests/ops (their parity tests draw the
#                      CUDA device too: fp32/fp16/bf16, and the > 2^31-element cases) and every test named for
#                      cuda / xformers / gpu elsewhere (xformers vs SDPA, the compiled model step on CUDA);
#                      4 xdist workers, one test file each at a time (--dist loadfile)
#   bench     ≤ 250 s  benchmarks/run.py --device cuda --dtype fp32,bf16 (paper shapes, the training step)
# Knobs (environment): STAGES="xformers tests bench" (setup always runs), TESTS_TIMEOUT, BENCH_TIMEOUT,
# TESTS_K (default "ops or cuda or xformers or gpu or 2_31"), TESTS_WORKERS (default 4; 0: serial),
# BENCH_ARGS (extra run.py arguments), PYTHON (default python3).
#
# Output under $OUT (the device tool brings back at most 8 files): summary.md (stages, exit codes, the
# targets table), env.log, xformers.log, tests.log, junit.xml, bench.log, results.json, results.md.
# To publish: copy results.md into benchmarks/RESULTS.md and results.json to benchmarks/results.json.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
STAGES="${STAGES:-xformers tests bench}"
TESTS_TIMEOUT="${TESTS_TIMEOUT:-150}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-250}"
TESTS_K="${TESTS_K:-ops or cuda or xformers or gpu or 2_31}"
TESTS_WORKERS="${TESTS_WORKERS:-4}"
BENCH_ARGS="${BENCH_ARGS:-}"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.md"
START=$(date +%s)

echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$SUMMARY"
echo "" >>"$SUMMARY"
echo "| stage | exit | seconds | note |" >>"$SUMMARY"
echo "|---|---|---|---|" >>"$SUMMARY"

# stage NAME TIMEOUT LOG CMD...: run CMD under `timeout` (SIGINT first, so pytest and run.py write what they
# have; SIGKILL 15 s later), tee its output into LOG, add a line to the summary.
stage() {
  local name="$1" limit="$2" log="$3"
  shift 3
  local t0 rc note=""
  t0=$(date +%s)
  echo "== [$name] (≤ ${limit} s, $(($(date +%s) - START)) s into the call): $*" | tee -a "$log"
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then note="TIMED OUT after ${limit} s"; fi
  echo "| $name | $rc | $(($(date +%s) - t0)) | $note |" >>"$SUMMARY"
  echo "== [$name] exit $rc in $(($(date +%s) - t0)) s $note" | tee -a "$log"
  return 0
}

# ------------------------------------------------------------------------------------------------ setup
setup() {
  set -x
  if ls .whl/xformers-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && echo "XFORMERS_CARRIED=yes"
  else
    echo "XFORMERS_CARRIED=no: .whl/xformers-*.whl absent; xformers results will read 'not run (wheel not carried)'"
  fi
  # xformers' optional C++ extension (_C.so: sparse and merge ops, not its attention, which calls PyTorch's own
  # kernels) links libcudart.so.12; the image's torch is built for CUDA 13. Unpacked to its own folder: the
  # wheel's nvidia/__init__.py must not shadow the image's nvidia packages on sys.path.
  if ! "$PY" -c "import ctypes; ctypes.CDLL('libcudart.so.12')" 2>/dev/null \
      && ls .whl/cudart12/*.whl >/dev/null 2>&1; then
    mkdir -p /tmp/cudart12
    "$PY" -c "import glob, zipfile; z = zipfile.ZipFile(glob.glob('.whl/cudart12/*.whl')[0]); \
open('/tmp/cudart12/libcudart.so.12', 'wb').write(z.read('nvidia/cuda_runtime/lib/libcudart.so.12'))"
  fi
  # This repo, without its dependencies (the image has torch, triton, timm; no network there).
  # PEP 660 editable install: its finder maps the top-level kernels/ to incrementer_fast.kernels (setup.py's
  # package_dir); a legacy `setup.py develop` would not.
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --use-pep517 -e . \
    || echo "editable install failed"
  if ! "$PY" -c "import incrementer_fast.kernels" ; then
    echo "incrementer_fast.kernels not importable: linking kernels/ as incrementer_fast/kernels in this copy"
    ln -sfn ../kernels incrementer_fast/kernels
  fi
  set +x
  nvidia-smi || true
  "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
for name in ("triton", "timm", "xformers", "numpy", "hypothesis", "pytest", "pytest-benchmark"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "NOT INSTALLED")
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("card:", p.name, "| SMs", p.multi_processor_count, "| memory GiB", round(p.total_memory / 2**30, 1))
import incrementer_fast as inc
print("incrementer_fast", inc.__version__, "from", inc.__file__, "| backend(cuda):", inc.backend("cuda"))
EOF
}

if [ -d /tmp/site ] || ls .whl/xformers-*.whl >/dev/null 2>&1; then
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export LD_LIBRARY_PATH="/tmp/cudart12${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PY
export -f setup
stage setup 45 "$OUT/env.log" bash -c setup
if ls /tmp/site/xformers >/dev/null 2>&1 || "$PY" -c "import xformers" 2>/dev/null; then
  XFORMERS_STATE="installed"
else
  XFORMERS_STATE="not run (wheel not carried)"
fi
echo "xformers: $XFORMERS_STATE" | tee -a "$OUT/env.log"

# --------------------------------------------------------------------------------------------- xformers
if [[ " $STAGES " == *" xformers "* ]]; then
  if [ "$XFORMERS_STATE" = "installed" ]; then
    stage xformers 25 "$OUT/xformers.log" "$PY" - <<'EOF'
import torch
import torch.nn.functional as F
import xformers
import xformers.ops as xops
from xformers import _cpp_lib

from incrementer_fast.attention import resolve_backend

print("xformers", xformers.__version__, "| C++ extension loaded:", _cpp_lib._cpp_library_load_exception is None)
print("model attention backend on cuda: fp32 ->", resolve_backend("cuda", torch.float32),
      "| bf16 ->", resolve_backend("cuda", torch.bfloat16))
failed = []
for dtype, bound in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 1024, 12, 64, device="cuda", dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    out = xops.memory_efficient_attention(q, k, v)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref = F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()
    errors = [rel(out, ref)] + [rel(a, b) for a, b in zip(grads, ref_grads)]
    verdict = "PASS" if max(errors) <= bound else "FAIL"
    print(f"{dtype}: rel err out/dq/dk/dv vs float64 SDPA = " + ", ".join(f"{e:.2e}" for e in errors)
          + f" (bound {bound:.0e}) {verdict}")
    if verdict != "PASS":
        failed.append(str(dtype))
assert not failed, f"xformers attention off the float64 reference for {failed}"
EOF
  else
    echo "| xformers | — | 0 | $XFORMERS_STATE |" >>"$SUMMARY"
  fi
fi

# ------------------------------------------------------------------------------------------------ tests
if [[ " $STAGES " == *" tests "* ]]; then
  XDIST=()
  if [ "$TESTS_WORKERS" -gt 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n "$TESTS_WORKERS" --dist loadfile)
  fi
  stage tests "$TESTS_TIMEOUT" "$OUT/tests.log" "$PY" -m pytest tests -q -p no:cacheprovider -m "not slow" \
    --continue-on-collection-errors -k "$TESTS_K" ${XDIST[@]+"${XDIST[@]}"} -rfEs --durations=15 \
    --junitxml="$OUT/junit.xml"
  if [ "$XFORMERS_STATE" != "installed" ]; then
    echo "NOTE: xformers $XFORMERS_STATE: its CUDA tests skipped or failed for that reason" | tee -a "$OUT/tests.log"
  fi
fi

# ------------------------------------------------------------------------------------------------ bench
if [[ " $STAGES " == *" bench "* ]]; then
  # run.py stops starting op cases at its budget (the training step keeps 60 s of it), before `timeout`.
  # shellcheck disable=SC2086
  stage bench "$BENCH_TIMEOUT" "$OUT/bench.log" "$PY" benchmarks/run.py --device cuda --dtype fp32,bf16 \
    --budget-s $((BENCH_TIMEOUT - 25)) --out "$OUT" $BENCH_ARGS
fi

# ---------------------------------------------------------------------------------------------- summary
{
  echo ""
  echo "xformers: $XFORMERS_STATE; total $(($(date +%s) - START)) s"
  if [ -f "$OUT/tests.log" ]; then
    echo ""
    echo "tests: $(grep -E '^[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s' "$OUT/tests.log" | tail -1)"
  fi
  if [ -f "$OUT/results.md" ]; then
    echo ""
    sed -n '/^## Targets/,/^## Per op/p' "$OUT/results.md" | sed '$d'
  fi
} >>"$SUMMARY"
cat "$SUMMARY"
