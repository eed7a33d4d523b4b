# Sourced by the GRPO scripts next to it: run verl's trainer with the script's "overrides" array,
# or, with DRY_RUN=1, compose and validate them against verl's own hydra config (no GPU needed).
# DRY_RUN_SAVE=PATH also writes the composed config there (YAML).
#   MODE: efficient (rollout.name=efficient) | ar (the plain vLLM twin: only the rollout lines differ)
case "${MODE:-}" in
  efficient) overrides+=(actor_rollout_ref.rollout.name=efficient "+actor_rollout_ref.rollout.custom=$EFFICIENT") ;;
  ar) overrides+=(actor_rollout_ref.rollout.name=vllm) ;;
  *) echo "usage: [DRY_RUN=1] bash $0 efficient|ar [extra hydra overrides]  (got MODE '${MODE:-}')" >&2; exit 2 ;;
esac
overrides+=(trainer.experiment_name="${EXPERIMENT}_${MODE}")
if [ "${DRY_RUN:-0}" = 1 ]; then
  exec "${PYTHON:-python3}" -m verl_efficientrollout.cli verl-dry-run ${DRY_RUN_SAVE:+--save "$DRY_RUN_SAVE"} -- "${overrides[@]}" "$@"
fi
set -x
exec "${PYTHON:-python3}" -m verl.trainer.main_ppo "${overrides[@]}" "$@"
