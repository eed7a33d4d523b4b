"""Faults the native engine survives: bad weight updates, a failing drafter build, a drafter that
produces NaN; each leaves the previous weights serving or falls back to plain decoding, and the
next good update brings everything back."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import verl_efficientrollout.engine.native as native
from verl_efficientrollout.config import SamplingParams
from verl_efficientrollout.controller import Controller, ControllerConfig
from verl_efficientrollout.engine.base import Request
from verl_efficientrollout.engine.native import NativeEngine

GREEDY = SamplingParams(temperature=0.0)
REQUESTS = [Request((1, 2, 3), 12, GREEDY, "a"), Request((4, 5), 12, GREEDY, "b")]


def _spec() -> Controller:
    return Controller(ControllerConfig.preset("sd-always", gamma=3))


def _tokens(engine: NativeEngine, controller: Controller | None = None) -> list[list[int]]:
    return [o.token_ids for o in engine.generate(REQUESTS, seed=0, controller=controller or _spec()).outputs]


def _new_state(model, scale: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {n: t + scale * torch.randn(t.shape, generator=g) for n, t in model.state_dict().items()}


@pytest.fixture()
def engine(small_model):
    return NativeEngine(copy.deepcopy(small_model))


def _interrupted(state: dict[str, torch.Tensor], after: int):
    for i, item in enumerate(state.items()):
        if i == after:
            raise ConnectionError("trainer worker died")
        yield item


@pytest.mark.parametrize("fault, message", [
    ("dtype", r"model.norm.weight has dtype torch.int64, expected a floating-point tensor"),
    ("nan", r"model.layers.0.mlp.up_proj.weight holds NaN or inf"),
    ("inf", r"model.layers.0.mlp.up_proj.weight holds NaN or inf"),
    ("extra", r"unknown \['model.layers.9.mlp.up_proj.weight'\]"),
    ("interrupted", r"weight stream failed after some tensors \(ConnectionError: trainer worker died\)"),
])
def test_bad_weight_update_is_rejected_and_the_previous_weights_and_drafter_keep_serving(engine, small_model,
                                                                                          fault, message):
    before, drafter = _tokens(engine), engine.drafter
    state = _new_state(small_model)
    if fault == "dtype":
        state["model.norm.weight"] = state["model.norm.weight"].long()
    elif fault in ("nan", "inf"):
        state["model.layers.0.mlp.up_proj.weight"][3, 5] = float(fault)
    elif fault == "extra":
        state["model.layers.9.mlp.up_proj.weight"] = torch.zeros(1)
    updates = _interrupted(state, after=len(state) // 2) if fault == "interrupted" else state.items()
    with pytest.raises(ValueError, match=message):
        engine.update_weights(updates)
    assert engine.weights_version == 0 and engine.drafter is drafter
    assert _tokens(engine) == before

    good = _new_state(small_model)
    engine.update_weights(good.items())  # the next good update applies cleanly
    reference = NativeEngine(copy.deepcopy(small_model))
    reference.update_weights(good.items())
    assert engine.weights_version == 1 and engine.drafter.weights_version == 1
    assert _tokens(engine) == _tokens(reference, Controller(ControllerConfig.preset("ar"))) != before


def test_drafter_build_error_falls_back_to_plain_decoding_and_a_later_rebuild_re_enables_it(
        engine, small_model, monkeypatch, caplog):
    plain = _tokens(engine, Controller(ControllerConfig.preset("ar")))
    real_build = native.build_drafter

    def broken(*args, **kwargs):
        raise RuntimeError("torchao: unsupported packing")

    monkeypatch.setattr(native, "build_drafter", broken)
    state = dict(small_model.state_dict())
    with caplog.at_level(logging.WARNING):
        engine.update_weights(state.items())  # the target update applies; the drafter does not come
    assert engine.weights_version == 1 and engine.drafter is None
    assert "drafter build failed with RuntimeError: torchao: unsupported packing" in caplog.text
    result = engine.generate(REQUESTS, seed=0, controller=_spec())
    assert [o.token_ids for o in result.outputs] == plain  # finished, plain decoding, same tokens
    assert not any(speculated for _, speculated, *_ in result.steps)

    monkeypatch.setattr(native, "build_drafter", real_build)
    engine.update_weights(state.items())
    assert engine.drafter is not None and engine.drafter.weights_version == 2
    result = engine.generate(REQUESTS, seed=0, controller=_spec())
    assert all(speculated for _, speculated, *_ in result.steps) and [o.token_ids for o in result.outputs] == plain


def test_nan_draft_logits_switch_speculation_off_once_and_the_rollout_finishes_lossless(engine, small_model, caplog):
    plain = _tokens(engine, Controller(ControllerConfig.preset("ar")))
    module = engine.drafter.module
    calls = {"n": 0}

    def poisoned(tokens, positions, cache, slots, **kwargs):  # [batch, 1] -> [batch, 1, vocab]
        calls["n"] += 1
        logits = type(module).forward(module, tokens, positions, cache, slots, **kwargs)
        return logits if calls["n"] < 5 else torch.full_like(logits, float("nan"))

    module.forward = poisoned
    with caplog.at_level(logging.WARNING):
        result = engine.generate(REQUESTS, seed=0, controller=_spec())
    assert [o.token_ids for o in result.outputs] == plain  # greedy: identical to plain decoding
    assert all(o.finish_reason == "length" for o in result.outputs)
    assert caplog.text.count("speculation switched off for this engine") == 1
    assert engine.drafter is None
    flags = [speculated for _, speculated, *_ in result.steps]
    assert flags[0] and not flags[-1]  # speculated until the fault, plain after it
    # Not called again after the step it misbehaved in (the step drafts its 3 tokens, then reads the device once).
    assert calls["n"] == 6

    engine.update_weights(small_model.state_dict().items())  # the next sync rebuilds a healthy drafter
    result = engine.generate(REQUESTS, seed=0, controller=_spec())
    assert all(speculated for _, speculated, *_ in result.steps) and [o.token_ids for o in result.outputs] == plain


def test_same_seed_and_weights_give_the_same_tokens_however_the_weights_arrived(small_model):
    state = _new_state(small_model, scale=0.1)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied, as the trainer would send them
    synced = NativeEngine(copy.deepcopy(small_model))
    synced.update_weights(state.items())  # weights streamed in, drafter rebuilt
    loaded = copy.deepcopy(small_model)
    loaded.load_state_dict(state)
    fresh = NativeEngine(loaded)  # the same weights loaded at start-up
    sampled = [Request((1, 2, 3), 16, SamplingParams(temperature=1.0), str(i)) for i in range(6)]
    for preset in ("sd-always", "ar"):
        runs = [[o.token_ids for o in e.generate(sampled, seed=11, controller=Controller(
            ControllerConfig.preset(preset))).outputs] for e in (synced, fresh, synced)]
        assert runs[0] == runs[1] == runs[2], preset


def test_a_weight_update_frees_the_previous_drafter_at_once(engine, small_model):
    import gc
    import weakref

    # torchao's quantized Linears reference themselves (a bound method on the module): a cycle.
    old = weakref.ref(next(m for m in engine.drafter.module.modules() if isinstance(m, torch.nn.Linear)))
    gc.disable()  # no automatic collection may happen to do it for us
    try:
        engine.update_weights(_new_state(small_model).items())
    finally:
        gc.enable()
    # Without an explicit collection the old int4 linears lived until some later full GC: a drafter's
    # worth of memory (66 MB for the default model) per update in a long run (found by examples/soak.py).
    assert old() is None and engine.drafter is not None
