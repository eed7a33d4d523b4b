"""The rollout server in-process: veRL's generate API over the native engine on the default model."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch

from verl_efficientrollout.bench import policy_update
from verl_efficientrollout.metrics import ROLLOUT_SUMMARY, SERVER_BATCH, VERL_REQUEST, WEIGHT_UPDATE
from verl_efficientrollout.verl_adapter.server import EfficientServer

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def engine(default_model_dir, make_settings):
    from verl_efficientrollout.engine.native import NativeEngine

    settings = make_settings(default_model_dir)
    return NativeEngine.load(default_model_dir, settings.efficient)


def run(server: EfficientServer, coroutine_fn):
    async def main():
        await server.launch()
        return await coroutine_fn()

    return asyncio.run(main())


def test_concurrent_generate_calls_decode_as_one_batch_with_verl_outputs(engine, default_model_dir, make_settings,
                                                                         chat_prompts):
    server = EfficientServer(make_settings(default_model_dir, batch_window_s=0.05), engine=engine)
    prompts = chat_prompts(2)
    params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True,
              "max_tokens": 24}

    async def calls():
        outputs = await asyncio.gather(*[
            server.generate(prompt_ids=prompts[i % 2], sampling_params=dict(params), request_id=f"r{i}")
            for i in range(6)
        ])
        return outputs, await server.get_metrics()

    outputs, metrics = run(server, calls)
    assert [m["batch"] for m in metrics] == [6]  # one engine batch, not six
    for output in outputs:
        assert type(output).__name__ == "TokenOutput"
        assert 0 < len(output.token_ids) <= 24
        assert output.stop_reason == "completed"
        assert len(output.log_probs) == len(output.token_ids) and all(lp <= 0 for lp in output.log_probs)
        fields = output.extra_fields
        assert fields["spec_num_verify_steps"] >= 1  # sd-always speculates from the first step
        assert 0 <= fields["spec_num_accepted_tokens"] <= fields["spec_num_draft_tokens"]
    assert metrics[0]["speculated_share"] == 1.0 and metrics[0]["acceptance_per_position"]
    # The metrics reference (docs/metrics.md) documents exactly what is reported.
    assert set(metrics[0]) == set(ROLLOUT_SUMMARY) | set(SERVER_BATCH)
    assert all(set(o.extra_fields) == set(VERL_REQUEST) for o in outputs)


def test_greedy_outputs_match_plain_decoding_of_the_engine(engine, default_model_dir, make_settings, chat_prompts):
    from verl_efficientrollout.config import SamplingParams
    from verl_efficientrollout.controller import Controller, ControllerConfig
    from verl_efficientrollout.engine.base import Request

    server = EfficientServer(make_settings(default_model_dir), engine=engine)
    prompt = chat_prompts(1)[0]

    async def call():
        return await server.generate(prompt_ids=prompt, sampling_params={"temperature": 0.0, "max_tokens": 32},
                                     request_id="g")

    output = run(server, call)
    plain = engine.generate([Request(tuple(prompt), 32, SamplingParams(0.0))],
                            controller=Controller(ControllerConfig.preset("ar")))
    assert output.token_ids == plain.outputs[0].token_ids
    assert output.extra_fields["spec_num_draft_tokens"] > 0


@pytest.mark.parametrize("params, field", [
    ({"temperature": 1.0, "repetition_penalty": 1.2}, "repetition_penalty"),
    ({"temperature": 1.0, "stop": ["\n"]}, "stop"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": 1.0, "ignore_eos": True}, "ignore_eos"),
])
def test_unsupported_sampling_params_fail_naming_the_field(engine, default_model_dir, params, field,
                                                          make_settings, chat_prompts):
    server = EfficientServer(make_settings(default_model_dir), engine=engine)
    with pytest.raises(ValueError, match=field):
        run(server, lambda: server.generate(prompt_ids=[1, 2, 3], sampling_params=params, request_id="bad"))


def test_prompt_longer_than_the_context_fails_alone(engine, default_model_dir, make_settings, chat_prompts):
    server = EfficientServer(make_settings(default_model_dir), engine=engine)
    prompt = chat_prompts(1)[0]

    async def calls():
        return await asyncio.gather(
            server.generate(prompt_ids=[1] * 600, sampling_params={"max_tokens": 4}, request_id="long"),
            server.generate(prompt_ids=prompt, sampling_params={"max_tokens": 4}, request_id="ok"),
            return_exceptions=True,
        )

    long, ok = run(server, calls)
    assert isinstance(long, ValueError) and "max_model_len" in str(long)
    assert len(ok.token_ids) == 4


def test_abort_ends_running_requests_and_new_ones_wait_for_resume(engine, default_model_dir, make_settings,
                                                                   chat_prompts, signal_on_progress):
    server = EfficientServer(make_settings(default_model_dir, response_length=400), engine=engine)
    prompt = chat_prompts(1)[0]
    # Greedy: the answer ends where it ends (far beyond the few steps before the abort), not by chance.
    params = {"temperature": 0.0, "max_tokens": 400}
    batches = []  # the batches the engine was given

    def progress(requests):  # progress: the engine polled for an abort before its 4th decode step
        batches.append([r.request_id for r in requests])
        polls = itertools.count(1)
        return lambda: next(polls) > 3

    decoding = signal_on_progress(engine, progress)

    async def calls():
        running = asyncio.ensure_future(
            server.generate(prompt_ids=prompt, sampling_params=dict(params), request_id="a"))
        await asyncio.to_thread(decoding.wait)  # observed progress: three decode steps done
        await server.abort_all_requests()
        aborted = await running
        waiting = asyncio.ensure_future(server.generate(prompt_ids=prompt, sampling_params={"max_tokens": 3},
                                                        request_id="b"))
        for _ in range(20):  # turns of the event loop, not time: a request let in is queued within one
            await asyncio.sleep(0)
        assert not waiting.done() and not server._queue and len(batches) == 1  # parked at admission
        await server.resume_generation()
        return aborted, await waiting

    aborted, resumed = run(server, calls)
    assert aborted.stop_reason == "aborted" and 3 <= len(aborted.token_ids) < 400  # the tokens so far
    assert resumed.stop_reason == "completed" and len(resumed.token_ids) == 3


def test_weight_update_is_all_or_nothing_and_rebuilds_the_drafter(default_model_dir, make_settings, chat_prompts):
    server = EfficientServer(make_settings(default_model_dir))
    prompt = chat_prompts(1)[0]

    async def scenario():
        await server.launch()
        engine = server.engine
        state = policy_update(engine.target.hf_state_dict(), 0.25, seed=7)
        before = {n: t.clone() for n, t in engine.target.hf_state_dict().items()}
        first = await server.generate(prompt_ids=prompt, sampling_params={"temperature": 0.0, "max_tokens": 8},
                                      request_id="before")
        # A partial update is rejected and the previous weights keep serving.
        await server.receive_weights([(n, t) for n, t in state.items() if "layers.3." not in n])
        with pytest.raises(ValueError, match="missing"):
            await server.commit_weights(global_steps=1)
        assert engine.weights_version == 0
        assert all(torch.equal(before[n], t) for n, t in engine.target.hf_state_dict().items())
        again = await server.generate(prompt_ids=prompt, sampling_params={"temperature": 0.0, "max_tokens": 8},
                                      request_id="after-rejected")
        assert again.token_ids == first.token_ids
        # A mis-shaped tensor is rejected too.
        await server.receive_weights([(n, t[:-1] if n == "model.norm.weight" else t) for n, t in state.items()])
        with pytest.raises(ValueError, match="shape"):
            await server.commit_weights(global_steps=1)
        # A complete update in two buckets: the target changes, the drafter is rebuilt from it.
        items = list(state.items())
        await server.receive_weights(items[: len(items) // 2])
        await server.receive_weights(items[len(items) // 2 :])
        stale = engine.drafter
        report = await server.commit_weights(global_steps=2)
        assert report["weights_version"] == 1 and report["drafter_build_seconds"] > 0
        assert set(report) == set(WEIGHT_UPDATE)
        assert engine.drafter is not stale and engine.drafter.report.weights_version == 1
        assert all(torch.equal(state[n], t) for n, t in engine.target.hf_state_dict().items())
        after = await server.generate(prompt_ids=prompt, sampling_params={"temperature": 0.0, "max_tokens": 8},
                                      request_id="after")
        assert after.extra_fields["global_steps"] == 2

    asyncio.run(scenario())


def test_the_server_refuses_to_load_vllm_naming_verls_own_vllm_server(default_model_dir):
    from verl_efficientrollout.config import EfficientRolloutConfig
    from verl_efficientrollout.verl_adapter.config import ServerSettings
    from verl_efficientrollout.verl_adapter.server import load_engine

    efficient = EfficientRolloutConfig.from_dict({"engine": "vllm", "drafter": "int4-g32"})
    settings = ServerSettings(model_path=default_model_dir, efficient=efficient, prompt_length=256, response_length=48)
    with pytest.raises(ValueError, match=r"custom\.efficient\.engine.*verl's own vLLM server"):
        load_engine(settings)
