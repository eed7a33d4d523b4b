#!/usr/bin/env bash
# The main job: set up .venv, then run the drafter quality report on the default model (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/efficient-rollout quality --out results/quality "$@"
