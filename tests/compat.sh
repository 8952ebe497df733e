#!/usr/bin/env bash
# The kernels against another Triton than the pinned one — by default 3.6, the GPU image's: a separate
# venv holds that Triton beside the project's pinned torch, and runs there
#   1. the op parity suite through Triton's interpreter (TRITON_INTERPRET=1 pytest tests/ops),
#   2. the sm_90 codegen test (every kernel compiled for an H100/H200 through ptxas, no GPU needed).
# Slow (both suites, a second Triton's compile caches cold): not part of CI (tests/run.sh). Run it after a
# kernel change and quote its result:
#
#     bash tests/compat.sh                       # Triton 3.6.0, venv .venv-triton36 (git-ignored)
#     TRITON_VERSION=3.7.1 bash tests/compat.sh  # another version, its own venv
#
# How the venv gets the pinned stack without a second copy of torch: it is created empty, a .pth file appends
# the site-packages that hold the project venv's torch (scripts/setup_env.sh's .venv) to its sys.path, and
# only Triton (without dependencies: torch's own pin on Triton is not enforced at import) and this package
# (editable, without dependencies) are installed into it. Its own site-packages come first on sys.path, so
# its Triton wins over the project venv's. Also NumPy 2.2 for Triton 3.6: its interpreter turns 1-element
# arrays into Python ints (`int(array)` for a loop bound), which the project's NumPy 2.4 refuses ("only
# 0-dimensional arrays can be converted to Python scalars") and 2.2 still allows with a DeprecationWarning
# (filtered below). That concerns the interpreter only: a GPU runs compiled kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
TRITON_VERSION="${TRITON_VERSION:-3.6.0}"
MINOR="${TRITON_VERSION%.*}"  # 3.6.0 → 3.6: one venv per minor version
VENV="${COMPAT_VENV:-.venv-triton${MINOR//./}}"
BASE_PYTHON="${BASE_PYTHON:-.venv/bin/python}"
START=$(date +%s)

if [ ! -x "$BASE_PYTHON" ]; then
  bash scripts/setup_env.sh
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
torch_site=$("$BASE_PYTHON" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
own_site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$torch_site" >"$own_site/zz_pinned_stack.pth"
"$VENV/bin/python" -m pip install -q --no-deps "triton==$TRITON_VERSION" "setuptools>=70" wheel
if [ "$MINOR" = 3.6 ]; then
  "$VENV/bin/python" -m pip install -q --no-deps "numpy==2.2.6"
fi
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation --use-pep517 -e .
"$VENV/bin/python" - <<EOF
import torch, triton, incrementer_fast
assert triton.__version__ == "$TRITON_VERSION", triton.__file__
print("compat venv $VENV: torch", torch.__version__, "| triton", triton.__version__, "from", triton.__file__)
print("incrementer_fast from", incrementer_fast.__file__)
EOF

status=0
echo "== TRITON_INTERPRET=1 pytest tests/ops (Triton $TRITON_VERSION)"
TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest tests/ops -q -p no:cacheprovider \
  -W "ignore:Conversion of an array with ndim > 0:DeprecationWarning" || status=1
echo "== pytest tests/test_cuda_codegen.py (Triton $TRITON_VERSION, sm_90)"
"$VENV/bin/python" -m pytest tests/test_cuda_codegen.py -q -p no:cacheprovider || status=1
echo "== compat.sh with Triton $TRITON_VERSION: $([ $status = 0 ] && echo PASSED || echo FAILED) in $(($(date +%s) - START)) s"
exit $status
