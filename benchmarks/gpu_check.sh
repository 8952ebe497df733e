#!/usr/bin/env bash
# Every key GPU number of incrementer_fast in ONE call of at most 400 s, so that a rerun fits in the
# 15 minutes of device time a session gets, machine start-up included.
#
# On a lent GPU machine, through the device tool, from the repository root (benchmarks/README.md):
#
#     run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=450)
#
# `.whl/` (git-ignored) holds the wheels the device image lacks: `bash benchmarks/fetch_device_wheels.sh` fills
# it on the development machine. Without it every stage still runs, on SDPA alone.
#
# Stages, in priority order, each boxed by `timeout` (SIGINT first, so run.py and pytest write what they have
# measured; SIGKILL 10 s later); the boxes add up to 390 s, the whole call's time (timeout_s=450 leaves room
# for five SIGKILL delays and the summary):
#   setup      ≤  45 s  carried wheels into /tmp/site (no network there), this repo editable without deps;
#                       versions, the card; whether xformers really loads and runs (XFORMERS_STATE); nvidia-smi
#   bench      ≤ 140 s  benchmarks/run.py at the paper shapes, fp32 and bf16, forward+backward, fused vs
#                       eager, in priority order (seg_head_loss and loss_stage K=151, cosine_mask K=151 and
#                       21, cds_dice_loss, fod_loss, pseudo_label, the K=21 seg head)
#   step       ≤  70 s  the training step, fused vs reference ops: bf16 autocast, then fp32 with TF32
#                       allowed for the backbone (stated in the table)
#   attention  ≤  25 s  xformers vs SDPA, forward+backward, at the model's shapes (the rule of
#                       attention="auto"); SDPA alone when xformers does not run
#   tests      ≤ 110 s  the CUDA tests (-k "$TESTS_K") with the light hypothesis profile "gpu": the op
#                       parity suite on CUDA (fp32/fp16/bf16), the > 2^31-element cases, the compiled model
#                       step with xformers and SDPA; 6 xdist workers, tests dealt one at a time (--dist load)
#                       when pytest-xdist is there (the image has it). The CPU-only tests that the -k words
#                       would also catch are left out: the sm_90 codegen test (the GPU compiles every kernel
#                       for real), the ledger's, this script's dry run
#
# Knobs (environment): STAGES (any of "bench step attention tests"; setup always runs), <STAGE>_TIMEOUT,
# TESTS_K, TESTS_WORKERS (0: serial), BENCH_ARGS (extra run.py arguments), PYTHON (default python3),
# DRY_RUN=1 (also automatic without a CUDA device: every stage is skipped, every file is still written —
# tests/test_gpu_check.py runs it so).
#
# Output under $OUT (the device tool brings back at most 8 files), all written even by a partial run:
#   summary.md (each stage's exit code, seconds, note; the targets table), env.log, bench.log (bench and step),
#   results.json, results.md (run.py's tables), attention.log, tests.log, junit.xml.
# To publish: results.md's measured tables go into benchmarks/RESULTS.md beside the modelled ones.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
STAGES="${STAGES:-bench step attention tests}"
SETUP_TIMEOUT="${SETUP_TIMEOUT:-45}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-140}"
STEP_TIMEOUT="${STEP_TIMEOUT:-70}"
ATTENTION_TIMEOUT="${ATTENTION_TIMEOUT:-25}"
TESTS_TIMEOUT="${TESTS_TIMEOUT:-110}"
TESTS_K="${TESTS_K:-(cuda or xformers or 2_31 or gpu) and not codegen and not ledger and not gpu_check}"
TESTS_WORKERS="${TESTS_WORKERS:-6}"
BENCH_ARGS="${BENCH_ARGS:-}"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.md"
START=$(date +%s)
FILES=(summary.md env.log bench.log results.json results.md attention.log tests.log junit.xml)
# The setup stage's verdict on xformers ("ok" or why not), read back after it (outside $OUT: 8 files at most).
XFORMERS_STATE_FILE=$(mktemp)
trap 'rm -f "$XFORMERS_STATE_FILE"' EXIT

if [ "${DRY_RUN:-0}" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  DRY_RUN=1
fi
DRY_RUN="${DRY_RUN:-0}"

{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo ""
  if [ "$DRY_RUN" = 1 ]; then
    echo "**Dry run: no CUDA device, every stage skipped; nothing here is a measurement.**"
    echo ""
  fi
  echo "| stage | exit | seconds | note |"
  echo "|---|---|---|---|"
} >"$SUMMARY"

# stage NAME LIMIT LOG CMD...: run CMD under `timeout` (SIGINT, SIGKILL 10 s later), its output appended to LOG,
# one line in the summary. In a dry run: a line saying it was skipped, in LOG and in the summary.
stage() {
  local name="$1" limit="$2" log="$3"
  shift 3
  local t0 rc note=""
  t0=$(date +%s)
  if [ "$DRY_RUN" = 1 ]; then
    echo "== [$name] skipped: no CUDA device (dry run)" >>"$log"
    echo "| $name | — | 0 | skipped: no CUDA device (dry run) |" >>"$SUMMARY"
    return 0
  fi
  echo "== [$name] (≤ ${limit} s, $(($(date +%s) - START)) s into the call): $*" | tee -a "$log"
  timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ] || [ "$rc" = 130 ]; then note="TIMED OUT after ${limit} s: partial"; fi
  echo "| $name | $rc | $(($(date +%s) - t0)) | $note |" >>"$SUMMARY"
  echo "== [$name] exit $rc in $(($(date +%s) - t0)) s $note" | tee -a "$log"
  tail -n 5 "$log"
  return 0
}

wanted() { [[ " $STAGES " == *" $1 "* ]]; }

# ------------------------------------------------------------------------------------------------ setup
setup() {
  set -x
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  else
    echo "no carried wheels in .whl/ (benchmarks/fetch_device_wheels.sh): xformers only if the image has it"
  fi
  # xformers' optional C++ extension links libcudart.so.12; the image's CUDA is 13. Unpacked to its own folder:
  # the wheel's nvidia/__init__.py must not shadow the image's nvidia packages on sys.path.
  if ls .whl/cudart12/*.whl >/dev/null 2>&1; then
    mkdir -p /tmp/cudart12
    "$PY" -c "import glob, zipfile; z = zipfile.ZipFile(glob.glob('.whl/cudart12/*.whl')[0]); \
open('/tmp/cudart12/libcudart.so.12', 'wb').write(z.read('nvidia/cuda_runtime/lib/libcudart.so.12'))"
  fi
  # This repo without its dependencies (the image has torch, triton, timm; there is no network). PEP 660
  # editable install: its finder maps the top-level kernels/ to incrementer_fast.kernels (setup.py).
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --use-pep517 -e . || echo "editable install failed"
  if ! "$PY" -c "import incrementer_fast.kernels"; then
    echo "incrementer_fast.kernels not importable: linking kernels/ as incrementer_fast/kernels in this copy"
    ln -sfn ../kernels incrementer_fast/kernels
  fi
  set +x
}

# Versions and the card; then, on a CUDA device, whether xformers loads *and runs* (a forward and backward of
# its split API, which the training op uses): "ok" or the reason, printed and written to $XFORMERS_STATE_FILE.
# One Python process for both: torch is imported once (seconds of the setup box).
environment_report() {
  "$PY" - <<'EOF'
import importlib.metadata as md, os, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
for name in ("triton", "timm", "xformers", "numpy", "hypothesis", "pytest", "pytest-xdist"):
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
state = "not checked (no CUDA device)"
if torch.cuda.is_available():
    try:
        import xformers.ops as xops
        q = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out, lse = xops.memory_efficient_attention_forward_requires_grad(q, q, q)
        xops.memory_efficient_attention_backward(torch.ones_like(out), out, lse, q, q, q)
        torch.cuda.synchronize()
        state = "ok"
    except Exception as error:  # not installed, built for another torch, no kernel for this card
        text = str(error).strip()
        state = f"unusable ({type(error).__name__}: {text.splitlines()[0][:150] if text else ''})"
print("xformers state:", state, flush=True)
if os.environ.get("XFORMERS_STATE_FILE"):
    with open(os.environ["XFORMERS_STATE_FILE"], "w") as file:
        file.write(state)
EOF
}

export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export LD_LIBRARY_PATH="/tmp/cudart12${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PY XFORMERS_STATE_FILE
export -f setup environment_report
stage setup "$SETUP_TIMEOUT" "$OUT/env.log" bash -c "setup; environment_report; nvidia-smi || true"
if [ "$DRY_RUN" = 1 ]; then
  environment_report >>"$OUT/env.log" 2>&1
  XFORMERS_STATE="not checked (dry run)"
else
  XFORMERS_STATE=$(cat "$XFORMERS_STATE_FILE" 2>/dev/null)
  XFORMERS_STATE="${XFORMERS_STATE:-unusable (not checked: the setup stage stopped before its check)}"
  # Without the editable install (setup's fallback linked kernels/ into the package), the repository's root
  # must be on the path of run.py and pytest, whose first sys.path entry is not the repository's root.
  if ! (cd / && "$PY" -c "import incrementer_fast.kernels") 2>/dev/null; then
    export PYTHONPATH="$PWD:$PYTHONPATH"
    echo "incrementer_fast not installed: the repository's root added to PYTHONPATH" | tee -a "$OUT/env.log"
  fi
fi
echo "xformers: $XFORMERS_STATE" | tee -a "$OUT/env.log"

# ------------------------------------------------------------------------------------------------ bench
if wanted bench; then
  # shellcheck disable=SC2086
  stage bench "$BENCH_TIMEOUT" "$OUT/bench.log" "$PY" benchmarks/run.py --device cuda --size paper \
    --dtype fp32,bf16 --modes forward+backward --providers fused,eager --no-step \
    --budget-s $((BENCH_TIMEOUT - 15)) --out "$OUT" $BENCH_ARGS
fi

# ------------------------------------------------------------------------------------------------- step
if wanted step; then
  stage step "$STEP_TIMEOUT" "$OUT/bench.log" "$PY" benchmarks/run.py --device cuda --size paper --no-ops \
    --step-dtype bf16,fp32 --step-tf32 --merge --out "$OUT"
fi

# -------------------------------------------------------------------------------------------- attention
if wanted attention; then
  stage attention "$ATTENTION_TIMEOUT" "$OUT/attention.log" env XFORMERS_STATE="$XFORMERS_STATE" "$PY" - <<'EOF'
"""xformers vs SDPA for training (forward + backward) at the model's shapes, through incrementer_fast's own
attention(), and the agreement of the two; the rule of attention="auto" (incrementer_fast/attention.py)."""
import os
import torch
import triton.testing

from incrementer_fast.attention import attention

usable = os.environ.get("XFORMERS_STATE") == "ok"
print("xformers:", os.environ.get("XFORMERS_STATE"))
cases = [("ViT-B/16 512² encoder", 8, 12, 1025, 64), ("decoder, K = 151", 8, 12, 1024 + 151, 64)]
for title, batch, heads, tokens, dim in cases:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, dim, device="cuda", dtype=torch.bfloat16, generator=g)
               .requires_grad_() for _ in range(3))
    upstream = torch.randn_like(q)
    times, outputs = {}, {}
    for backend in ("sdpa", "xformers") if usable else ("sdpa",):
        def step():
            return torch.autograd.grad(attention(q, k, v, backend=backend), (q, k, v), upstream)
        outputs[backend] = step()
        times[backend] = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
    line = f"{title} (B={batch}, heads={heads}, M={tokens}, Dh={dim}, bf16) fwd+bwd: SDPA {times['sdpa']:.3f} ms"
    if usable:
        errors = [((a.double() - b.double()).norm() / b.double().norm()).item()
                  for a, b in zip(outputs["xformers"], outputs["sdpa"])]
        ratio = times["sdpa"] / times["xformers"]
        line += (f", xformers {times['xformers']:.3f} ms: xformers {ratio:.2f}× SDPA's speed "
                 f"({'at least as fast' if ratio >= 1.0 else 'slower'}); grads rel. diff "
                 + ", ".join(f"{e:.1e}" for e in errors))
    else:
        line += "; xformers not run (SDPA-only numbers)"
    print(line, flush=True)
EOF
fi

# ------------------------------------------------------------------------------------------------ tests
if wanted tests; then
  TESTS_SELECTION="$TESTS_K"
  if [ "$XFORMERS_STATE" != ok ] && [ "$DRY_RUN" != 1 ]; then
    TESTS_SELECTION="($TESTS_K) and not xformers"
    echo "NOTE: xformers $XFORMERS_STATE: its tests are deselected" >>"$OUT/tests.log"
  fi
  XDIST=()
  if [ "$DRY_RUN" != 1 ] && [ "$TESTS_WORKERS" -gt 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n "$TESTS_WORKERS" --dist load)
  fi
  stage tests "$TESTS_TIMEOUT" "$OUT/tests.log" env HYPOTHESIS_PROFILE=gpu "$PY" -m pytest tests -q \
    -p no:cacheprovider -m "not slow" -k "$TESTS_SELECTION" ${XDIST[@]+"${XDIST[@]}"} -rfEs --durations=10 \
    --junitxml="$OUT/junit.xml"
fi

# ---------------------------------------------------------------------------------------------- summary
# Every file exists even when its stage was skipped or cut short (the device tool returns what is there).
for file in "${FILES[@]}"; do
  [ -e "$OUT/$file" ] && continue
  case "$file" in
    results.json) echo '{"not_run": "no benchmark stage wrote results (dry run, skipped or failed before its first case)"}' >"$OUT/$file" ;;
    junit.xml) echo '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="not run" tests="0"/></testsuites>' >"$OUT/$file" ;;
    *) echo "not run: $( [ "$DRY_RUN" = 1 ] && echo 'dry run, no CUDA device' || echo 'stage skipped or failed before writing')" >"$OUT/$file" ;;
  esac
done
{
  echo ""
  echo "xformers: $XFORMERS_STATE; total $(($(date +%s) - START)) s"
  if grep -q "fwd+bwd" "$OUT/attention.log" 2>/dev/null; then
    echo ""
    grep "fwd+bwd" "$OUT/attention.log" | sed 's/^/- /'
  fi
  if grep -qE "(passed|failed|error)" "$OUT/tests.log" 2>/dev/null; then
    echo ""
    echo "tests: $(grep -E '(passed|failed|error).* in [0-9.]+s' "$OUT/tests.log" | tail -1)"
  fi
  if grep -q "^## Targets" "$OUT/results.md" 2>/dev/null; then
    echo ""
    sed -n '/^## Targets/,/^## Per op/p' "$OUT/results.md" | sed '$d'
  fi
} >>"$SUMMARY"
cat "$SUMMARY"
