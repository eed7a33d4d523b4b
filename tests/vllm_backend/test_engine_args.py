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
    assert args["per_request_spec_decode_metrics"] == "detailed"
    spec = args["speculative_config"]
    assert spec == {"method": "draft_model", "model": "/m", "quantization": "efficient_int4_g64",
                    "num_speculative_tokens": 5, "draft_sample_method": "probabilistic"}


def test_threshold_becomes_vllms_batch_size_table():
    spec = engine_args("/m", config(toggle="threshold", draft_length="fixed", gamma=3,
                                    threshold_batch_size=4))["speculative_config"]
    assert spec["num_speculative_tokens_per_batch_size"] == [(1, 4, 3), (5, 64, 0)]


@pytest.mark.parametrize("controller, field", [
    ({"preset": "efficient"}, "toggle"),
    ({"toggle": "always", "draft_length": "adaptive"}, "draft_length"),
])
def test_policies_the_vllm_backend_cannot_run_yet_fail_naming_the_field(controller, field):
    with pytest.raises(ValueError, match=f"controller.{field}"):
        engine_args("/m", config(**controller))
