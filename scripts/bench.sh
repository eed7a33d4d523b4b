#!/usr/bin/env bash
# The main job: set up .venv, then benchmark rollout latency per speculation policy on the default model (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/efficient-rollout bench --out results/bench "$@"
