"""The SGLang backend on the real engine (sglang 0.5.12) and the default model.

On this CPU SGLang serves plain decoding (torch-native attention) and builds the STANDALONE
speculative engine, but its draft and verify steps run Triton/CUDA kernels only: the tests that
decode with drafts skip on a machine without a GPU, naming that, and run where SGLang has one."""

from __future__ import annotations


import pytest
import torch

from verl_efficientrollout.bench import policy_update
from verl_efficientrollout.config import SamplingParams
from verl_efficientrollout.engine.base import Request

pytest.importorskip("sglang", reason="the SGLang engine tests run in the sglang tier (.venv-sglang, sglang 0.5.12)")

from verl_efficientrollout.sglang_backend.compat import on_cpu  # noqa: E402

pytestmark = [pytest.mark.model, pytest.mark.slow]

GAMMA = 3  # the K of the `speculative` engine

needs_gpu = pytest.mark.skipif(on_cpu(), reason="SGLang's STANDALONE draft and verify steps need a GPU: its draft "
                               "attention backends and tree-verify kernels are Triton/CUDA only (none runs on CPU)")


@pytest.fixture(scope="module")
def plain(model_dir, sglang_config):
    from verl_efficientrollout.sglang_backend.engine import SGLangEngine

    engine = SGLangEngine(model_dir, sglang_config(preset="ar"))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def speculative(model_dir, sglang_config):
    """SGLang with the int4-asym-g32 self-drafter at K = GAMMA. On a CPU SGLang has no draft
    attention backend, so the Triton one is named: the engine then starts and loads, quantizes
    and refreshes its drafter, and only a step with drafts would fail (the CPU tests run none)."""
    from verl_efficientrollout.sglang_backend.engine import SGLangEngine

    extra = {"server_args": {"speculative_draft_attention_backend": "triton"}} if on_cpu() else {}
    engine = SGLangEngine(model_dir, sglang_config(extra, preset="sd-always", gamma=GAMMA))
    yield engine
    engine.close()


TEST_DTYPE = "float32"  # as the tier's engines (conftest.py says why)


def _greedy(prompts, tokens=24) -> list[Request]:
    return [Request(p, tokens, SamplingParams(0.0), request_id=str(i)) for i, p in enumerate(prompts)]


def _fingerprint(state: dict[str, torch.Tensor]) -> float:
    """What our plugin reports of the drafter: the sum of the decoder linears it quantized, as
    SGLang holds them (in the tier's dtype)."""
    return sum(float(t.to(getattr(torch, TEST_DTYPE)).double().sum()) for name, t in state.items()
               if ".layers." in name and name.endswith("proj.weight"))


def test_plain_sglang_serves_a_batch_to_eos_with_log_probs(plain, prompts, model_dir):
    from transformers import AutoTokenizer

    from verl_efficientrollout.data import SHORT_ANSWER_QUESTIONS, chat_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    short = [tuple(chat_ids(tokenizer, q)) for q in SHORT_ANSWER_QUESTIONS]
    requests = [Request(p, 96, SamplingParams(0.0), request_id=str(i), logprobs=True)
                for i, p in enumerate(short + prompts[:2])]  # answers that end, and two that run to the cap
    result = plain.generate(requests)
    for request, output in zip(requests, result.outputs):
        assert output.request_id == request.request_id and 0 < len(output.token_ids) <= 96
        assert output.finish_reason in ("stop", "length")
        assert (output.token_ids[-1] == 2) == (output.finish_reason == "stop")  # <|im_end|>, the converted EOS
        assert len(output.log_probs) == len(output.token_ids) and all(lp <= 0.0 for lp in output.log_probs)
    assert any(o.finish_reason == "stop" for o in result.outputs)
    assert [o.token_ids for o in plain.generate(requests).outputs] == [o.token_ids for o in result.outputs]
    # (Seeded sampling: SGLang honours per-request seeds only in its deterministic inference mode,
    # whose attention backends are GPU-only, so temperature-1 reproducibility is not tested here.)
    assert result.drafted_per_position == [] and all(o.num_draft_tokens == 0 for o in result.outputs)


def test_a_request_sglang_cannot_serve_fails_alone_naming_why(plain, prompts, assert_refuses_unservable_requests):
    assert_refuses_unservable_requests(plain, prompts[0])


def test_abort_ends_every_running_request_with_its_tokens_so_far_and_serving_goes_on(plain, prompts):
    """Greedy rows of up to 400 tokens, aborted once SGLang has reported the first tokens (observed
    progress, not a time): greedy, so no row can end first by chance."""
    requests = [Request(p, 400, SamplingParams(0.0)) for p in prompts]
    aborted = plain.generate(requests, seed=1, should_abort=lambda: plain.tokens_so_far() > 0)
    assert all(o.finish_reason == "abort" and len(o.token_ids) < 400 for o in aborted.outputs), \
        [(o.finish_reason, len(o.token_ids)) for o in aborted.outputs]
    assert any(o.token_ids for o in aborted.outputs)  # what they had generated comes back
    after = plain.generate(_greedy(prompts[:2], 8))
    assert all(o.finish_reason in ("stop", "length") and o.token_ids for o in after.outputs)


def test_a_weight_update_serves_exactly_the_new_policy_and_a_bad_one_changes_nothing(
        plain, prompts, original_weights, model_dir, tmp_path, sglang_config):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verl_efficientrollout.sglang_backend.engine import SGLangEngine

    requests = _greedy(prompts)
    updated = policy_update(original_weights, 0.05, seed=7, embeddings=True)
    poisoned = {**updated, "model.layers.3.mlp.down_proj.weight": torch.full((576, 1536), float("nan"))}
    partial = {k: v for k, v in updated.items() if "layers.5." not in k}
    before = [o.token_ids for o in plain.generate(requests).outputs]
    try:
        for bad in (poisoned, partial):
            with pytest.raises(ValueError, match="weight update rejected"):
                plain.update_weights(bad.items())
        assert plain.weights_version == 0
        assert [o.token_ids for o in plain.generate(requests).outputs] == before
        plain.update_weights(updated.items())
        assert plain.weights_version == 1
        served = [o.token_ids for o in plain.generate(requests).outputs]
    finally:
        plain.update_weights(original_weights.items())
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    policy.load_state_dict(updated)
    policy.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp_path)
    fresh = SGLangEngine(str(tmp_path), sglang_config(preset="ar"))
    try:
        reference = [o.token_ids for o in fresh.generate(requests).outputs]
    finally:
        fresh.close()
    assert served == reference and served != before  # the update is the new policy, token for token
    # Closing one engine leaves the others of this process serving (SGLang's own shutdown kills them all).
    assert [o.token_ids for o in plain.generate(requests).outputs] == before


def test_the_drafter_is_quantized_from_the_checkpoint_and_rebuilt_from_every_update(speculative, original_weights):
    assert speculative.drafter_recipe == "int4-asym-g32" and speculative.drafter_version == 0
    assert speculative.drafter_fingerprint == pytest.approx(_fingerprint(original_weights), rel=1e-6)
    updated = policy_update(original_weights, 0.05, seed=8, embeddings=True)
    try:
        speculative.update_weights(updated.items())
        assert (speculative.weights_version, speculative.drafter_version) == (1, 1)
        assert speculative.drafter_build_seconds > 0
        assert speculative.drafter_fingerprint == pytest.approx(_fingerprint(updated), rel=1e-6)
        assert speculative.drafter_fingerprint != pytest.approx(_fingerprint(original_weights), rel=1e-6)
        with pytest.raises(ValueError, match="weight update rejected"):
            speculative.update_weights({k: v for k, v in updated.items() if "layers.2." not in k}.items())
        assert (speculative.weights_version, speculative.drafter_version) == (1, 1)
    finally:
        speculative.update_weights(original_weights.items())
    assert speculative.drafter_fingerprint == pytest.approx(_fingerprint(original_weights), rel=1e-6)


@needs_gpu
def test_temperature_one_output_distribution_is_that_of_plain_sglang(speculative, plain, sampler_p_values):
    """Speculative vs plain SGLang at temperature 1, as for vLLM (``sampler_p_values``)."""
    p_values = sampler_p_values(plain, speculative)
    assert min(p_values) > 0.0025, p_values


@needs_gpu
def test_acceptance_of_the_on_grid_drafter_and_per_request_counts(speculative, prompts):
    result = speculative.generate([Request(p, 32, SamplingParams(1.0)) for p in prompts], seed=3)
    assert result.drafted_per_position and result.accepted_per_position[0] / result.drafted_per_position[0] > 0.85
    assert sum(o.num_accepted_tokens for o in result.outputs) == sum(result.accepted_per_position)
    assert all(o.num_draft_tokens == GAMMA * o.num_verify_steps for o in result.outputs)
