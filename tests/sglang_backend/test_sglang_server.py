"""veRL's rollout server (``verl_adapter.server``) with ``engine: sglang``: the server loads the
SGLang engine itself, batches verl's per-sample calls, aborts, and takes weight updates all or
nothing. verl itself is not in this tier (its transformers pin differs from sglang 0.5.12's); the
server's engine-facing calls are what verl's agent loop and weight sender drive (tests/verl_adapter)."""

from __future__ import annotations

import asyncio

import pytest

from verl_efficientrollout.bench import policy_update
from verl_efficientrollout.config import SamplingParams
from verl_efficientrollout.engine.base import Request

pytest.importorskip("sglang", reason="the SGLang engine tests run in the sglang tier (.venv-sglang, sglang 0.5.12)")

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(model_dir, sglang_config, run):
    from verl_efficientrollout.verl_adapter.config import ServerSettings
    from verl_efficientrollout.verl_adapter.server import EfficientServer

    settings = ServerSettings(model_dir, sglang_config(preset="ar"), prompt_length=256, response_length=256)
    server = EfficientServer(settings)
    assert run(server.launch()) == "none"  # load_engine started sglang.Engine: plain decoding
    yield server
    server.engine.close()


def _greedy(prompts) -> list[Request]:
    return [Request(p, 16, SamplingParams(0.0), request_id=str(i)) for i, p in enumerate(prompts)]


def test_concurrent_calls_decode_as_one_sglang_batch_and_a_weight_update_is_all_or_nothing(
        server, prompts, original_weights, run, verl_calls):
    from verl_efficientrollout.sglang_backend.engine import SGLangEngine

    assert isinstance(server.engine, SGLangEngine)
    requests = _greedy(prompts)
    updated = policy_update(original_weights, 0.05, seed=7, embeddings=True)
    partial = {k: v for k, v in updated.items() if "layers.5." not in k}

    async def scenario():
        await server.get_metrics()  # the module's server is shared: drop what earlier tests' batches left
        version = server.engine.weights_version
        before = [o.token_ids for o in await verl_calls.serve(server, requests)]
        metrics = await server.get_metrics()
        with pytest.raises(ValueError, match="weight update rejected"):
            await verl_calls.send_weights(server, partial, global_steps=1)
        after_bad = [o.token_ids for o in await verl_calls.serve(server, requests)]
        report = await verl_calls.send_weights(server, updated, global_steps=1)
        served = [o.token_ids for o in await verl_calls.serve(server, requests)]
        await verl_calls.send_weights(server, original_weights, global_steps=2)
        restored = [o.token_ids for o in await verl_calls.serve(server, requests)]
        return version, before, metrics, after_bad, report, served, restored

    version, before, metrics, after_bad, report, served, restored = run(scenario())
    assert [m["batch"] for m in metrics] == [len(requests)]  # verl's per-sample calls became one engine batch
    assert after_bad == before and report["weights_version"] == version + 1
    assert served != before and restored == before


def test_abort_ends_a_running_sglang_batch_with_the_tokens_so_far_and_serving_resumes(server, prompts, run,
                                                                                      verl_calls, signal_on_progress):
    cap = 400
    engine = server.engine
    # Set once SGLang has reported tokens (the engine polls between its checks of SGLang's progress).
    reported = signal_on_progress(engine, lambda requests: engine.tokens_so_far)

    async def scenario():
        long = [Request(p, cap, SamplingParams(0.0), request_id=f"long-{i}") for i, p in enumerate(prompts)]
        running = [asyncio.create_task(server.submit(r)) for r in long]
        # Observed progress: SGLang's first reported tokens (greedy, so no row ends first by chance).
        await asyncio.to_thread(reported.wait)
        await server.abort_all_requests()
        aborted = await asyncio.gather(*running)
        await server.resume_generation()
        return aborted, await verl_calls.serve(server, _greedy(prompts))

    aborted, after = run(scenario())
    assert any(o.finish_reason == "abort" for o in aborted) and all(len(o.token_ids) < cap for o in aborted)
    assert all(o.finish_reason in ("stop", "length") and o.token_ids for o in after)
