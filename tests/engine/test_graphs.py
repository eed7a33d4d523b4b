"""The static-shape decode path (batch buckets, key buckets, padding) that CUDA graphs replay,
run eagerly on a CPU (``decode_graphs='padded'``), and the slot compaction it relies on."""

from __future__ import annotations

import copy

import pytest
import torch

from verl_efficientrollout.config import EfficientRolloutConfig, SamplingParams
from verl_efficientrollout.controller import Controller, ControllerConfig
from verl_efficientrollout.engine.base import Request
from verl_efficientrollout.engine.graphs import StepRunner, batch_bucket, key_bucket, resolve_mode
from verl_efficientrollout.engine.model import KVCache
from verl_efficientrollout.engine.native import NativeEngine, NativeEngineConfig, _compact

GREEDY = SamplingParams(temperature=0.0)


def _engine(model, mode: str) -> NativeEngine:
    return NativeEngine(model, EfficientRolloutConfig(),
                        NativeEngineConfig(dtype="float32", max_model_len=300, decode_graphs=mode))


def test_batches_pad_to_powers_of_two_and_keys_to_power_of_two_buckets_within_the_cache():
    assert [batch_bucket(b) for b in (1, 2, 3, 5, 8, 9, 16, 17, 33, 100)] == [1, 2, 4, 8, 8, 16, 16, 32, 64, 128]
    assert key_bucket(1, 2048) == 256 and key_bucket(256, 2048) == 256 and key_bucket(257, 2048) == 512
    assert key_bucket(1500, 2048) == 2048 and key_bucket(300, 400) == 400  # never past the cache
    with pytest.raises(ValueError, match="batch must be >= 1"):
        batch_bucket(0)
    with pytest.raises(ValueError, match=r"keys must be in \[1, 400\]"):
        key_bucket(401, 400)


def test_graph_modes_resolve_per_device_and_bad_modes_are_refused():
    assert resolve_mode("auto", "cpu") == "off" and resolve_mode("auto", "cuda") == "on"
    assert resolve_mode("padded", "cpu") == "padded"
    with pytest.raises(ValueError, match="decode_graphs='on' needs a CUDA device"):
        StepRunner("on", "cpu")
    with pytest.raises(ValueError, match=r"NativeEngineConfig.decode_graphs must be one of 'auto', 'off', 'padded', 'on'"):
        NativeEngineConfig(decode_graphs="always")
    with pytest.raises(ValueError, match=r"decode_graphs='on' needs device cuda"):
        NativeEngineConfig(decode_graphs="on", device="cpu")


def test_padded_forward_gives_the_exact_rows_logits_and_pads_into_free_slots(small_model):
    engine = _engine(small_model, "off")
    args = engine.target.args
    exact, padded = StepRunner("off", "cpu"), StepRunner("padded", "cpu")
    assert padded.slots_needed(5) == 8 and exact.slots_needed(5) == 5
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (5, 3), generator=generator)
    lengths = torch.tensor([7, 2, 11, 4, 9])
    positions = lengths[:, None] + torch.arange(3)
    caches = []
    for runner in (exact, padded):
        cache = KVCache(args, 8, 300, engine.target.dtype)
        prefix = torch.randn(cache.k[:, :5, :, :12].shape, generator=torch.Generator().manual_seed(1))
        cache.k[:, :5, :, :12], cache.v[:, :5, :, :12] = prefix, -prefix
        caches.append((runner(engine.target, tokens, positions, int(positions.max()) + 1, cache), cache))
    (exact_logits, exact_cache), (padded_logits, padded_cache) = caches
    assert padded_logits.shape == exact_logits.shape == (5, 3, args.vocab_size)
    torch.testing.assert_close(padded_logits, exact_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded_cache.k[:, :5], exact_cache.k[:, :5], rtol=1e-5, atol=1e-5)
    assert padded_cache.k[:, 5:8, :, 1:].abs().sum() == 0  # padded rows wrote position 0 of free slots only


def test_padded_path_decodes_greedy_tokens_identical_to_the_exact_path(small_model):
    """Odd batch sizes (padding in every step), rows finishing at different steps, every policy."""
    exact, padded = _engine(small_model, "off"), _engine(small_model, "padded")
    prompts = [(1, 2, 3), (4, 5), (6, 7, 8, 9, 10), (11,), (12, 13), (3, 9, 27)]
    requests = [Request(p, budget, GREEDY, str(i)) for i, (p, budget) in enumerate(zip(prompts, (40, 7, 23, 31, 3, 17)))]
    for preset, overrides in (("ar", {}), ("sd-always", {"gamma": 3}), ("sd-always", {"gamma": 1}),
                              ("efficient", {"prior_acceptance": 0.9})):
        runs = [engine.generate(requests, controller=Controller(ControllerConfig.preset(preset, **overrides)))
                for engine in (exact, padded)]
        assert [o.token_ids for o in runs[1].outputs] == [o.token_ids for o in runs[0].outputs], preset
        assert [batch for batch, *_ in runs[1].steps] == [batch for batch, *_ in runs[0].steps], preset


def test_compaction_moves_the_surviving_rows_kv_down_in_order(small_model):
    args = _engine(small_model, "off").target.args
    cache = KVCache(args, 5, 16, torch.float32)
    for slot in range(5):
        cache.k[:, slot], cache.v[:, slot] = float(slot + 1), -float(slot + 1)
    lengths = {10: 16, 11: 16, 12: 9, 13: 16, 14: 12}  # committed tokens of rows 10..14, in slots 0..4
    _compact(cache, [10, 11, 12, 13, 14], [12, 14], lengths)
    assert (cache.k[:, 0, :, :9] == 3).all() and (cache.v[:, 0, :, :9] == -3).all()  # row 12, its 9 positions
    assert (cache.k[:, 1, :, :12] == 5).all() and (cache.v[:, 1, :, :12] == -5).all()  # row 14


def test_a_failed_capture_falls_back_to_eager_with_one_warning(small_model, caplog):
    """On this CPU-only machine a capture really fails (no CUDA): the step still runs, eagerly,
    with the exact path's logits, and only the first failure warns."""
    import logging

    engine = _engine(small_model, "off")
    runner = StepRunner("on", "cuda")  # constructing asks nothing of CUDA; capturing does
    cache = KVCache(engine.target.args, 4, 64, torch.float32)
    tokens, positions = torch.tensor([[3], [5], [7]]), torch.tensor([[0], [0], [0]])
    with caplog.at_level(logging.WARNING):
        logits = runner(engine.target, tokens, positions, 1, cache)
        runner(engine.target, tokens, positions, 1, cache)  # the module stays eager: no second capture
        other = copy.copy(engine.target)  # another module fails too, but warns no more
        runner(other, tokens, positions, 1, cache)
    reference = engine.target(tokens, positions, KVCache(engine.target.args, 4, 64, torch.float32), slice(0, 3), keys=1)
    torch.testing.assert_close(logits, reference)
    assert caplog.text.count("CUDA graph capture of DecoderLM failed") == 1 and runner.captures == 0
