#!/usr/bin/env bash
# The device check (issue 29): examples/gpu_check.py in one call of at most 8 minutes, with only what the
# device machine has (torch, transformers) plus the wheels carried in .whl/ (torchao; see the README).
#   bash scripts/gpu_check.sh          on a CUDA machine: docs/measured/<gpu>/gpu_check.{json,md}
#   bash scripts/gpu_check.sh --dry    on a CPU, tiny sizes (what the test suite runs); --out DIR for another place
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site .whl/*.whl
  export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout 480 "$PYTHON" examples/gpu_check.py "$@"
