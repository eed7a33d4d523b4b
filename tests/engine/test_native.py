"""The native engine: lossless speculative decoding end to end, compaction, weights, bad input."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from verl_efficientrollout.config import DrafterConfig, EfficientRolloutConfig, SamplingParams
from verl_efficientrollout.controller import Controller, ControllerConfig
from verl_efficientrollout.engine.base import Request
from verl_efficientrollout.engine.native import NativeEngine, NativeEngineConfig

GREEDY = SamplingParams(temperature=0.0)


def _controller(preset: str, **overrides) -> Controller:
    return Controller(ControllerConfig.preset(preset, **overrides))


@pytest.fixture(scope="module")
def small_engine(small_model):
    return NativeEngine(small_model, EfficientRolloutConfig(), NativeEngineConfig(dtype="float32", max_model_len=64))


@pytest.fixture(scope="module")
def default_engine():
    return NativeEngine.load("default", EfficientRolloutConfig(), NativeEngineConfig(dtype="float32"))


@pytest.mark.model
def test_greedy_speculative_output_is_identical_to_plain_decoding(default_engine):
    """fp32, temperature 0: every gamma and every policy gives AR's tokens, token for token."""
    from verl_efficientrollout.data import chat_prompt_ids, math_problems

    tokenizer = default_engine.tokenizer
    prompts = [tuple(chat_prompt_ids(tokenizer, p)) for p in math_problems()[:3]]
    requests = [Request(p, 40, GREEDY, str(i)) for i, p in enumerate(prompts)] + [Request(prompts[0], 25, GREEDY, "x")]
    plain = default_engine.generate(requests, controller=_controller("ar"))
    assert all(len(o.token_ids) > 0 for o in plain.outputs)
    runs = {f"sd-always gamma={g}": _controller("sd-always", gamma=g, gamma_max=8) for g in (1, 2, 4, 8)}
    runs["threshold"] = _controller("ar", toggle="threshold", threshold_batch_size=2, gamma=3)
    runs["paper"] = _controller("paper", paper_min_requests=0, prior_acceptance=0.95)
    runs["efficient"] = _controller("efficient", prior_acceptance=0.95)
    for name, controller in runs.items():
        speculative = default_engine.generate(requests, controller=controller)
        assert [o.token_ids for o in speculative.outputs] == [o.token_ids for o in plain.outputs], name
        assert [o.finish_reason for o in speculative.outputs] == [o.finish_reason for o in plain.outputs], name
        if name.startswith("sd-always"):
            assert controller.stats.speculated_steps == len(speculative.steps) > 0
            assert controller.stats.token_acceptance > 0.8  # on-grid int4 drafter of the default model


def test_same_seed_same_tokens_and_a_new_seed_differs(small_engine):
    requests = [Request((1, 2, 3), 12, SamplingParams(temperature=1.0), str(i)) for i in range(4)]
    run = lambda seed: [o.token_ids for o in small_engine.generate(requests, seed, _controller("sd-always")).outputs]
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_finished_rows_leave_the_batch(small_engine):
    budgets = (1, 3, 8, 20)
    requests = [Request((4, 5), budget, SamplingParams(temperature=1.0), str(budget)) for budget in budgets]
    result = small_engine.generate(requests, controller=_controller("ar"))
    assert [len(o.token_ids) for o in result.outputs] == list(budgets)
    assert all(o.finish_reason == "length" for o in result.outputs)
    batches = [batch for batch, *_ in result.steps]
    assert batches == sorted(batches, reverse=True) and batches[0] == 3 and batches[-1] == 1
    assert len(batches) == max(budgets) - 1  # the first token comes from the prefill


def test_rows_stop_at_eos_and_keep_it(small_model):
    model = copy.deepcopy(small_model)
    model.generation_config.eos_token_id = 7
    engine = NativeEngine(model, engine_config=NativeEngineConfig(max_model_len=256))
    requests = [Request((1, 2), 150, SamplingParams(temperature=1.0), str(i)) for i in range(16)]
    result = engine.generate(requests, controller=_controller("sd-always", gamma=3))
    stopped = [o for o in result.outputs if o.finish_reason == "stop"]
    assert stopped, "some of 16 rows of 150 tokens must sample token 7"
    assert all(o.token_ids[-1] == 7 and 7 not in o.token_ids[:-1] for o in stopped)


def test_bad_requests_fail_alone_and_an_empty_batch_fails_before_any_work(small_engine):
    with pytest.raises(ValueError, match="at least one Request"):
        small_engine.generate([])
    with pytest.raises(ValueError, match=r"Request.max_new_tokens must be an integer >= 1"):
        Request((1, 2), 0)
    with pytest.raises(ValueError, match=r"Request.prompt_ids must be a non-empty"):
        Request((), 4)
    with pytest.raises(ValueError, match=r"SamplingParams.top_p must be"):
        Request((1,), 4, SamplingParams(top_p=0.0))
    requests = [Request((1, 2), 4, request_id="ok"), Request((1,) * 70, 4, request_id="long"),
                Request((1, 99), 4, request_id="vocab")]
    outputs = small_engine.generate(requests).outputs
    assert [o.finish_reason for o in outputs] == ["length", "error", "error"]
    assert "exceeds max_model_len 64" in outputs[1].error and "vocab size 32" in outputs[2].error
    assert len(outputs[0].token_ids) == 4


def test_weight_update_rebuilds_the_drafter_and_bad_updates_keep_the_old_weights(small_model):
    engine = NativeEngine(copy.deepcopy(small_model))
    requests = [Request((1, 2, 3), 10, GREEDY)]
    before = engine.generate(requests, controller=_controller("ar")).outputs[0].token_ids
    new_state = {name: t + 0.3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1))
                 for name, t in small_model.state_dict().items()}
    with pytest.raises(ValueError, match="missing"):
        engine.update_weights((n, t) for n, t in new_state.items() if "layers.1.mlp" not in n)
    bad_shape = dict(new_state, **{"model.norm.weight": torch.ones(3)})
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(3,\)"):
        engine.update_weights(bad_shape.items())
    assert engine.weights_version == 0
    assert engine.generate(requests, controller=_controller("ar")).outputs[0].token_ids == before

    engine.update_weights(new_state.items())
    assert engine.weights_version == 1 and engine.drafter.weights_version == 1
    updated = NativeEngine(copy.deepcopy(small_model))
    updated.update_weights(new_state.items())
    after = engine.generate(requests, controller=_controller("sd-always")).outputs[0].token_ids
    assert after == updated.generate(requests, controller=_controller("ar")).outputs[0].token_ids
    assert after != before


def test_drafter_build_failure_falls_back_to_plain_decoding(small_model, caplog):
    config = EfficientRolloutConfig(drafter=DrafterConfig(group_size=256))  # no linear fits 256-groups
    with caplog.at_level(logging.WARNING):
        engine = NativeEngine(small_model, config)
    assert engine.drafter is None and "decoding without speculation" in caplog.text
    result = engine.generate([Request((1, 2), 6, GREEDY)], controller=_controller("sd-always"))
    assert len(result.outputs[0].token_ids) == 6 and not any(speculated for _, speculated, *_ in result.steps)


def test_auto_dtype_times_float32_and_bfloat16_here_and_keeps_the_faster(small_model):
    engine = NativeEngine(small_model, EfficientRolloutConfig(), NativeEngineConfig(max_model_len=64))
    choice = engine.dtype_choice
    assert set(choice["timings"]) == {"float32", "bfloat16"}
    for timings in choice["timings"].values():
        assert set(timings) == {"target@1", "target@16", "draft@1", "draft@16"}
        assert all(seconds > 0 for seconds in timings.values())
    totals = {dtype: sum(timings.values()) for dtype, timings in choice["timings"].items()}
    assert choice["dtype"] == min(totals, key=totals.get) and choice["dtype"] in choice["reason"]
    assert engine.engine_config.dtype == choice["dtype"] and engine.target.dtype == getattr(torch, choice["dtype"])
    assert engine.generate([Request((1, 2), 5, GREEDY)]).outputs[0].finish_reason == "length"
    # One measurement per process and model shape: a second engine agrees without measuring again.
    assert NativeEngine(small_model, engine_config=NativeEngineConfig(max_model_len=64)).dtype_choice is choice
    explicit = NativeEngine(small_model, engine_config=NativeEngineConfig(dtype="bfloat16", max_model_len=64))
    assert explicit.dtype_choice is None and explicit.target.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"NativeEngineConfig.dtype must be one of 'auto', 'float32', 'bfloat16'"):
        NativeEngineConfig(dtype="int8")


def test_log_probs_are_the_targets_own_for_every_sampled_token_with_and_without_speculation(small_engine):
    from verl_efficientrollout.engine.model import KVCache

    prompt, new = (1, 2, 3), 10
    for preset in ("ar", "sd-always"):
        request = Request(prompt, new, SamplingParams(temperature=1.0), logprobs=True)
        output = small_engine.generate([request, request], seed=2, controller=_controller(preset)).outputs[1]
        ids = list(prompt) + output.token_ids
        with torch.inference_mode():
            cache = KVCache(small_engine.target.args, 1, len(ids), small_engine.target.dtype)
            logits = small_engine.target(torch.tensor([ids]), torch.arange(len(ids))[None], cache, torch.tensor([0]))[0]
        expected = logits[len(prompt) - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(output.token_ids)[:, None])[:, 0]
        assert len(output.log_probs) == new, preset
        torch.testing.assert_close(torch.tensor(output.log_probs), expected, atol=1e-4, rtol=1e-4)
