#!/usr/bin/env bash
# GRPO on GSM8K with Qwen2.5-0.5B-Instruct on one GPU.
#   bash examples/grpo/gsm8k_qwen2.5-0.5b.sh efficient   # rollout.name=efficient
#   bash examples/grpo/gsm8k_qwen2.5-0.5b.sh ar          # its twin: verl's plain vLLM rollout
#   DRY_RUN=1 bash examples/grpo/gsm8k_qwen2.5-0.5b.sh efficient   # check the overrides, no GPU
#   ENGINE=vllm bash examples/grpo/gsm8k_qwen2.5-0.5b.sh efficient   # served by the vLLM backend
#   ENGINE=sglang bash examples/grpo/gsm8k_qwen2.5-0.5b.sh efficient # served by the SGLang backend (fixed K)
# Data: python examples/grpo/prepare_data.py gsm8k (writes $DATA/gsm8k/{train,test}.parquet).
# Profile: efficient-rollout calibrate --model <local model dir> --device cuda --dtype bfloat16 \
#            --name qwen2.5-0.5b-gpu --out $HOME/profiles   (a few minutes; PROFILE below points at it)
# Extra arguments after the mode are passed to verl as hydra overrides.
set -euo pipefail
MODE=${1:-}; shift || true
DATA=${DATA:-$HOME/data}
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
PROFILE=${PROFILE:-$HOME/profiles/qwen2.5-0.5b-gpu.json}
EXPERIMENT=gsm8k_qwen2.5-0.5b
ENGINE=${ENGINE:-native}  # or vllm / sglang: that backend serves the efficient rollout
CONTROLLER="{preset: efficient, profile: '$PROFILE'}"
# SGLang fixes its draft length when the engine starts (no per-step toggle): K = 3 throughout.
if [ "$ENGINE" = sglang ]; then CONTROLLER="{preset: sd-always, gamma: 3}"; fi
EFFICIENT="{efficient: {engine: $ENGINE, drafter: int4-g128, controller: $CONTROLLER, native: {dtype: bfloat16, device: cuda}}}"
overrides=(
  algorithm.adv_estimator=grpo
  algorithm.use_kl_in_reward=False
  data.train_files="$DATA/gsm8k/train.parquet"
  data.val_files="$DATA/gsm8k/test.parquet"
  data.train_batch_size=128
  data.max_prompt_length=512
  data.max_response_length=1024
  data.filter_overlong_prompts=True
  data.truncation=error
  actor_rollout_ref.model.path="$MODEL"
  actor_rollout_ref.model.use_remove_padding=True
  actor_rollout_ref.model.enable_gradient_checkpointing=True
  actor_rollout_ref.actor.optim.lr=1e-6
  actor_rollout_ref.actor.ppo_mini_batch_size=64
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16
  actor_rollout_ref.actor.use_kl_loss=True
  actor_rollout_ref.actor.kl_loss_coef=0.001
  actor_rollout_ref.actor.kl_loss_type=low_var_kl
  actor_rollout_ref.actor.entropy_coeff=0
  actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=32
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=32
  actor_rollout_ref.rollout.tensor_model_parallel_size=1
  actor_rollout_ref.rollout.gpu_memory_utilization=0.5
  actor_rollout_ref.rollout.n=5
  actor_rollout_ref.rollout.temperature=1.0
  trainer.critic_warmup=0
  trainer.logger=[console]
  trainer.project_name=verl_efficientrollout
  trainer.n_gpus_per_node=1
  trainer.nnodes=1
  trainer.save_freq=-1
  trainer.test_freq=5
  trainer.total_epochs=3
)
source "$(dirname "$0")/_launch.sh"
