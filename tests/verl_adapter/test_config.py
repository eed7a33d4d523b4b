"""verl's own hydra config (ppo_trainer) with rollout.name=efficient builds verl's and our configs."""

from __future__ import annotations

from pathlib import Path

import pytest


def compose(*overrides: str):
    import verl
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    config_dir = str(Path(verl.__file__).parent / "trainer" / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = hydra_compose(config_name="ppo_trainer", overrides=[
            "actor_rollout_ref.rollout.name=efficient", "algorithm.adv_estimator=grpo", *overrides])
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)


def test_ppo_trainer_config_with_our_overrides_builds_both_configs():
    from verl.workers.config import RolloutConfig

    from verl_efficientrollout.verl_adapter.config import efficient_config

    rollout = compose(
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.response_length=1024",
        "+actor_rollout_ref.rollout.custom={efficient: {drafter: int4-g64, "
        "controller: {preset: efficient, gamma_max: 7}, native: {dtype: float32}}}",
    )
    assert isinstance(rollout, RolloutConfig) and rollout.name == "efficient"
    config = efficient_config(rollout)
    assert config.drafter.name == "int4-asym-g64"
    assert config.controller.gamma_max == 7 and config.controller.toggle == "roofline"
    assert config.native.dtype == "float32"
    assert config.native.max_model_len == rollout.prompt_length + 1024


def test_without_custom_section_the_defaults_follow_verl_settings():
    from verl_efficientrollout.verl_adapter.config import efficient_config

    config = efficient_config(compose("actor_rollout_ref.rollout.tensor_model_parallel_size=1"))
    assert config.drafter.name == "int4-asym-g32" and config.native.dtype == "bfloat16"  # verl's rollout.dtype
    assert config.native.device == "auto"


def test_engine_vllm_takes_verls_rollout_settings_unless_its_own_section_sets_them():
    from verl_efficientrollout.verl_adapter.config import server_settings

    rollout = compose("+actor_rollout_ref.rollout.custom={efficient: {engine: vllm, vllm: {max_num_seqs: 8}}}",
                      "actor_rollout_ref.rollout.gpu_memory_utilization=0.4", "actor_rollout_ref.rollout.prompt_length=100",
                      "actor_rollout_ref.rollout.response_length=300")
    settings = server_settings(rollout, "/m")
    v = settings.efficient.vllm
    assert settings.efficient.engine == "vllm" and v.dtype == "bfloat16" and v.gpu_memory_utilization == 0.4
    assert v.max_num_seqs == 8 and v.max_model_len == 400 == settings.max_model_len


def test_engine_sglang_takes_verls_rollout_settings_unless_its_own_section_sets_them():
    from verl_efficientrollout.verl_adapter.config import server_settings

    rollout = compose("+actor_rollout_ref.rollout.custom={efficient: {engine: sglang, controller: {preset: sd-always}, "
                      "sglang: {max_num_seqs: 8}}}", "actor_rollout_ref.rollout.gpu_memory_utilization=0.4",
                      "actor_rollout_ref.rollout.prompt_length=100", "actor_rollout_ref.rollout.response_length=300")
    settings = server_settings(rollout, "/m")
    s = settings.efficient.sglang
    assert settings.efficient.engine == "sglang" and s.dtype == "bfloat16" and s.mem_fraction_static == 0.4
    assert s.max_num_seqs == 8 and s.max_model_len == 400 == settings.max_model_len


@pytest.mark.parametrize("custom, field", [
    ("{efficient: {drafter: {recipe: int4, group_size: 48}}}", "group_size"),
    ("{efficient: {drafter: int3-g32}}", "drafter recipe"),
    ("{efficient: {controller: {preset: fastest}}}", "preset"),
    ("{efficient: {gamma: 4}}", "unknown keys"),
    ("{efficient: {native: {dtype: int8}}}", "dtype"),
    ("{efficient: {engine: tensorrt}}", "engine"),
    ("{efficient: {engine: vllm, vllm: {gpu_memory_utilization: 1.5}}}", "gpu_memory_utilization"),
])
def test_bad_overrides_fail_when_the_config_is_built_naming_the_field(custom, field):
    from verl_efficientrollout.verl_adapter.config import efficient_config

    rollout = compose(f"+actor_rollout_ref.rollout.custom={custom}")
    with pytest.raises(ValueError, match=field) as info:
        efficient_config(rollout)
    assert "actor_rollout_ref.rollout.custom.efficient" in str(info.value)
