#!/usr/bin/env bash
# The project's test command (README "Run the tests"; .ci/run runs exactly this).
# 1. set up .venv with the pinned stack and the package;
# 2. the whole suite on the reference path (CPU tensors take the plain-PyTorch reference);
# 3. the op parity suite again with TRITON_INTERPRET=1: the very same Triton kernels run through
#    Triton's interpreter on the CPU and are checked against the float64 reference.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
echo "== reference path: whole suite"
.venv/bin/python -m pytest tests -q -p no:cacheprovider
echo "== TRITON_INTERPRET=1: kernel parity suite (tests/ops)"
TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/ops -q -p no:cacheprovider
