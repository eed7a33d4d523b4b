"""How our configs map onto vLLM's engine arguments (no engine started; runs in every tier)."""

from __future__ import annotations

import pytest

from verl_efficientrollout.config import EfficientRolloutConfig
from verl_efficientrollout.vllm_backend.engine import engine_args


def config(**controller):
    return EfficientRolloutConfig.from_dict({"engine": "vllm", "drafter": "int4-g64", "controller": controller,
                                             "vllm": {"max_num_seqs": 64}})


def test_plain_decoding_has_no_speculative_config():
    args = engine_args("/m", config(preset="ar"))
    assert "speculative_config" not in args and "per_request_spec_decode_metrics" not in args


def test_fixed_gamma_drafts_with_the_targets_own_checkpoint_quantized_by_our_method():
    args = engine_args("/m", config(preset="sd-always", gamma=5))
    assert args["per_request_spec_decode_metrics"] == "detailed" and args["disable_log_stats"] is False
    spec = args["speculative_config"]
    assert spec == {"method": "draft_model", "model": "/m", "quantization": "efficient_int4_g64",
                    "num_speculative_tokens": 5, "draft_sample_method": "probabilistic"}


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
