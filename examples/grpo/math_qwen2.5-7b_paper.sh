#!/usr/bin/env bash
# The paper's setting: GRPO, Qwen2.5-7B, MATH levels 3-5, 128 prompts x 8 samples, responses up
# to 8192 tokens, temperature 1.0, rollout tensor parallel 1, one node of 8 GPUs.
#   bash examples/grpo/math_qwen2.5-7b_paper.sh efficient   # rollout.name=efficient
#   bash examples/grpo/math_qwen2.5-7b_paper.sh ar          # its twin: verl's plain vLLM rollout
#   DRY_RUN=1 bash examples/grpo/math_qwen2.5-7b_paper.sh efficient   # check the overrides, no GPU
#   ENGINE=vllm bash examples/grpo/math_qwen2.5-7b_paper.sh efficient   # served by the vLLM backend
#   ENGINE=sglang bash examples/grpo/math_qwen2.5-7b_paper.sh efficient # served by the SGLang backend (fixed K)
# Data: python examples/grpo/prepare_data.py math (writes $DATA/math_l3to5/{train,test}.parquet).
# Profile: efficient-rollout calibrate --model <local model dir> --device cuda --dtype bfloat16 \
#            --name qwen2.5-7b-gpu --out $HOME/profiles
# Extra arguments after the mode are passed to verl as hydra overrides.
set -euo pipefail
MODE=${1:-}; shift || true
DATA=${DATA:-$HOME/data}
MODEL=${MODEL:-Qwen/Qwen2.5-7B}
PROFILE=${PROFILE:-$HOME/profiles/qwen2.5-7b-gpu.json}
EXPERIMENT=math_l3to5_qwen2.5-7b
# The paper's drafter recipe (int4, group 128) and its toggle + ladder ("paper" preset); set
# preset: efficient for ours (per-step toggle with hysteresis, goodput-optimal gamma).
ENGINE=${ENGINE:-native}  # or vllm / sglang: that backend serves the efficient rollout
CONTROLLER="{preset: paper, profile: '$PROFILE'}"
# SGLang fixes its draft length when the engine starts (no per-step toggle): K = 3 throughout.
if [ "$ENGINE" = sglang ]; then CONTROLLER="{preset: sd-always, gamma: 3}"; fi
EFFICIENT="{efficient: {engine: $ENGINE, drafter: int4-g128, controller: $CONTROLLER, native: {dtype: bfloat16, device: cuda}}}"
overrides=(
  algorithm.adv_estimator=grpo
  algorithm.use_kl_in_reward=False
  data.train_files="$DATA/math_l3to5/train.parquet"
  data.val_files="$DATA/math_l3to5/test.parquet"
  data.train_batch_size=128
  data.max_prompt_length=1024
  data.max_response_length=8192
  data.filter_overlong_prompts=True
  data.truncation=error
  actor_rollout_ref.model.path="$MODEL"
  actor_rollout_ref.model.use_remove_padding=True
  actor_rollout_ref.model.enable_gradient_checkpointing=True
  actor_rollout_ref.actor.optim.lr=1e-6
  actor_rollout_ref.actor.ppo_mini_batch_size=64
  actor_rollout_ref.actor.use_dynamic_bsz=True
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=24576
  actor_rollout_ref.actor.use_kl_loss=True
  actor_rollout_ref.actor.kl_loss_coef=0.001
  actor_rollout_ref.actor.kl_loss_type=low_var_kl
  actor_rollout_ref.actor.entropy_coeff=0
  actor_rollout_ref.actor.fsdp_config.param_offload=False
  actor_rollout_ref.actor.fsdp_config.optimizer_offload=False
  actor_rollout_ref.ref.fsdp_config.param_offload=True
  actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True
  actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True
  actor_rollout_ref.rollout.tensor_model_parallel_size=1
  actor_rollout_ref.rollout.gpu_memory_utilization=0.6
  actor_rollout_ref.rollout.n=8
  actor_rollout_ref.rollout.temperature=1.0
  trainer.critic_warmup=0
  trainer.logger=[console]
  trainer.project_name=verl_efficientrollout
  trainer.n_gpus_per_node=8
  trainer.nnodes=1
  trainer.save_freq=-1
  trainer.test_freq=10
  trainer.total_epochs=1
)
source "$(dirname "$0")/_launch.sh"
