"""How our configs map onto SGLang's server arguments (no engine started; runs in every tier; the
last test hands them to SGLang's own ``ServerArgs`` where SGLang is installed)."""

from __future__ import annotations

import pytest

from verl_efficientrollout.config import EfficientRolloutConfig
from verl_efficientrollout.sglang_backend.engine import server_args


def config(sglang=None, **controller):
    return EfficientRolloutConfig.from_dict({"engine": "sglang", "drafter": "int4-g64", "controller": controller,
                                             "sglang": {"max_num_seqs": 64, "max_model_len": 1024, **(sglang or {})}})


def test_plain_decoding_has_no_speculative_arguments():
    args = server_args("/m", config(preset="ar"), seed=7)
    assert not any(key.startswith("speculative") for key in args)
    assert (args["model_path"], args["context_length"], args["max_running_requests"], args["random_seed"]) == \
        ("/m", 1024, 64, 7)
    assert args["skip_tokenizer_init"] is True  # token ids in, token ids out, as verl sends them


def test_a_fixed_gamma_drafts_a_chain_with_the_targets_own_checkpoint_quantized_by_our_method():
    args = server_args("/m", config(preset="sd-always", gamma=5))
    assert {k: v for k, v in args.items() if k.startswith("speculative")} == {
        "speculative_algorithm": "STANDALONE", "speculative_draft_model_path": "/m",
        "speculative_draft_model_quantization": "efficient_int4_g64", "speculative_num_steps": 5,
        "speculative_eagle_topk": 1, "speculative_num_draft_tokens": 6}


@pytest.mark.parametrize("controller", [
    {"preset": "efficient"}, {"preset": "paper"},
    {"toggle": "threshold", "draft_length": "fixed"}, {"toggle": "always", "draft_length": "adaptive"},
])
def test_controls_sglang_has_no_hook_for_fail_naming_what_it_supports(controller):
    with pytest.raises(ValueError, match="engine sglang supports controller.toggle 'off', or 'always' with "
                                         "draft_length 'fixed'.*no per-step or per-batch hook"):
        server_args("/m", config(**controller))


def test_extra_server_args_pass_through_and_win():
    args = server_args("/m", config({"server_args": {"max_running_requests": 3, "schedule_policy": "fcfs"}},
                                    preset="ar"))
    assert args["max_running_requests"] == 3 and args["schedule_policy"] == "fcfs"


@pytest.mark.parametrize("sglang, message", [
    ({"dtype": "fp8"}, "SGLangEngineConfig.dtype must be one of"),
    ({"mem_fraction_static": 1.5}, "SGLangEngineConfig.mem_fraction_static must be"),
    ({"server_args": ["x"]}, "SGLangEngineConfig.server_args must be a mapping"),
    ({"nope": 1}, r"SGLangEngineConfig got unknown keys \['nope'\]"),
])
def test_bad_sglang_settings_fail_naming_the_field(sglang, message):
    with pytest.raises(ValueError, match=message):
        config(sglang, preset="ar")


@pytest.mark.model
def test_sglangs_own_server_args_accept_ours_with_the_drafter_method_registered(model_dir):
    pytest.importorskip("sglang", reason="needs SGLang (the sglang tier, .venv-sglang)")
    from sglang.srt.server_args import ServerArgs

    from verl_efficientrollout.sglang_backend import plugin

    plugin.register()
    parsed = ServerArgs(**server_args(model_dir, config(preset="sd-always", gamma=3)))
    assert (parsed.speculative_algorithm, parsed.speculative_num_steps, parsed.speculative_eagle_topk,
            parsed.speculative_num_draft_tokens) == ("STANDALONE", 3, 1, 4)
    assert parsed.speculative_draft_model_quantization == "efficient_int4_g64"
