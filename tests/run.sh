#!/usr/bin/env bash
# The project's test command (README "Run the tests"; .ci/run runs exactly this).
# 1. set up .venv with the pinned stack and the package;
# 2. the whole suite on the reference path (CPU tensors take the plain-PyTorch reference), two workers;
# 3. at the same time, the op parity suite (tests/ops) twice with TRITON_INTERPRET=1 — the very same Triton
#    kernels run through Triton's interpreter on the CPU and are checked against the float64 reference:
#    a. with the H100's launch plan (INCREMENTER_FAST_PLAN=h100: the tiles, bands, class blocks and grids an
#       H100 launches), recording which kernel lines ran (--kernel-lines: probes in the interpreted kernel
#       source, written as coverage.py data; coverage.py's own tracer doubled this pass), then
#       tests/kernel_coverage.py fails the run if a line of a @triton.jit function did not execute;
#    b. with the interpreter's own launch plan (the default off a GPU), without the tests marked
#       plan_independent (torch.compile's graph, the dispatch: what no launch plan changes; pass a runs them),
#       drawing the hypothesis profile "light" (2 examples per property, the explicit examples included)
#       unless HYPOTHESIS_PROFILE is set.
#    (The H200 plan launches exactly what the H100 plan does: tests/test_cuda_codegen.py checks it.)
# HYPOTHESIS_PROFILE=thorough bash tests/run.sh draws many more examples (much longer).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
LOGS=$(mktemp -d)
# The interpreter passes are single-threaded Python: one torch thread each, so three jobs share two cores.
export OMP_NUM_THREADS=1

echo "== starting the kernel parity suite through the interpreter: H100 plan (kernel lines) and interpreter plan"
(TRITON_INTERPRET=1 INCREMENTER_FAST_PLAN=h100 $PY -m pytest tests/ops -q -p no:cacheprovider \
    --kernel-lines="$LOGS/kernels.coverage" > "$LOGS/h100.log" 2>&1
 echo $? > "$LOGS/h100.rc") &
(TRITON_INTERPRET=1 INCREMENTER_FAST_PLAN=interpreter HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-light}" \
    $PY -m pytest tests/ops -q -p no:cacheprovider \
    -m "not plan_independent" > "$LOGS/interpreter.log" 2>&1; echo $? > "$LOGS/interpreter.rc") &

echo "== reference path: whole suite"
set +e
$PY -m pytest tests -q -p no:cacheprovider -n 2
reference_rc=$?
wait
set -e

echo "== TRITON_INTERPRET=1 INCREMENTER_FAST_PLAN=h100: kernel parity suite (tests/ops), kernel lines recorded"
cat "$LOGS/h100.log"
h100_rc=$(cat "$LOGS/h100.rc")
coverage_rc=0
if [ "$h100_rc" = 0 ]; then
  echo "== every line of every @triton.jit function ran under the H100 plan?"
  $PY -m coverage json --data-file="$LOGS/kernels.coverage" -o "$LOGS/kernels.json" -q
  $PY tests/kernel_coverage.py "$LOGS/kernels.json" kernels/*.py || coverage_rc=$?
fi
echo "== TRITON_INTERPRET=1 INCREMENTER_FAST_PLAN=interpreter: kernel parity suite (tests/ops)"
cat "$LOGS/interpreter.log"
interpreter_rc=$(cat "$LOGS/interpreter.rc")
echo "== exit codes: reference $reference_rc, h100 plan $h100_rc, kernel coverage $coverage_rc, interpreter plan $interpreter_rc"
[ "$reference_rc" = 0 ] && [ "$h100_rc" = 0 ] && [ "$coverage_rc" = 0 ] && [ "$interpreter_rc" = 0 ]
