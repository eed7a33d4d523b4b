"""The simulator on hand-computed cases.

Handmade costs: target step max(1, 0.24 * new_tokens * batch) s (1 s for plain decoding, 1.2 s
to verify gamma 4 at batch 1, 2.4 s at batch 2), draft forward 0.5 s.
"""

import pytest

from verl_efficientrollout.controller import (
    Controller,
    ControllerConfig,
    CostModel,
    CostProfile,
    StepCost,
    Trace,
    load_profile,
    simulate,
    simulate_ar,
)


def handmade_model():
    target = StepCost(weight_bytes=1, kv_bytes_per_token=0, flops_per_token=0.24, attn_flops_per_context_token=0,
                      bandwidth=1, flops_rate=1)
    draft = StepCost(0, 0, 0, 0, bandwidth=1, flops_rate=1, overhead_s=0.5)
    return CostModel(CostProfile("handmade", "test", target, draft), refine_rate=0.0)


def always(gamma):
    return Controller(ControllerConfig(toggle="always", draft_length="fixed", gamma=gamma), handmade_model())


def test_one_row_full_acceptance_needs_two_speculative_steps():
    trace = Trace(prompt_lengths=(5,), response_lengths=(10,), acceptance=(1.0,))
    sd = simulate(trace, always(4), handmade_model())
    ar = simulate_ar(trace, handmade_model())
    assert sd.total_seconds == pytest.approx(2 * (4 * 0.5 + 1.2))
    assert (sd.steps, sd.speculated_steps, sd.tokens, sd.gamma_histogram) == (2, 2, 10, {4: 2})
    assert ar.total_seconds == pytest.approx(10.0)
    assert (ar.steps, ar.speculated_steps, ar.tokens, ar.gamma_histogram) == (10, 0, 10, {0: 10})


def test_two_rows_batch_shrinks_when_the_short_row_finishes():
    trace = Trace(prompt_lengths=(5, 5), response_lengths=(10, 3), acceptance=(1.0,))
    sd = simulate(trace, always(4), handmade_model())
    # step 1: batch 2, 4 * 0.5 + 2.4; the short row is done (3 < 5); step 2: batch 1, 4 * 0.5 + 1.2
    assert [(b, g) for b, _, g, _ in sd.per_step] == [(2, 4), (1, 4)]
    assert sd.total_seconds == pytest.approx(4.4 + 3.2)
    assert sd.tokens == 13
    ar = simulate_ar(trace, handmade_model())
    assert ar.total_seconds == pytest.approx(10.0)  # 3 steps at batch 2, 7 at batch 1, 1 s each
    assert [b for b, *_ in ar.per_step] == [2] * 3 + [1] * 7


def test_fractional_progress_with_partial_acceptance():
    # acceptance 0.5, gamma 2: 1.75 tokens per step; 7 tokens take exactly 4 steps of 2 s
    trace = Trace(prompt_lengths=(0,), response_lengths=(7,), acceptance=(0.5,))
    sd = simulate(trace, always(2), handmade_model())
    assert (sd.steps, sd.total_seconds) == (4, pytest.approx(8.0))
    assert simulate_ar(trace, handmade_model()).total_seconds == pytest.approx(7.0)  # here SD loses


def test_simulator_feeds_the_controller_expected_acceptance():
    trace = Trace(prompt_lengths=(0,) * 4, response_lengths=(400,) * 4, acceptance=(0.9,))
    ctrl = always(3)
    simulate(trace, ctrl, handmade_model())
    assert ctrl.estimator.rates()[:3] == pytest.approx((0.9,) * 3, abs=1e-3)
    assert ctrl.stats.mean_acceptance_length == pytest.approx(1 + 0.9 + 0.81 + 0.729)


def test_efficient_controller_speeds_up_the_tail_and_leaves_a_large_batch_alone():
    true = CostModel(load_profile("cpu-smollm2-135m"), refine_rate=0.0)
    few = Trace(prompt_lengths=(100,) * 4, response_lengths=(140, 188, 464, 512), acceptance=(0.95,))
    many = Trace(prompt_lengths=(100,) * 64, response_lengths=(300,) * 64, acceptance=(0.95,))
    ratio = lambda trace, preset: (simulate(trace, Controller(ControllerConfig.preset(preset)), true).total_seconds
                                   / simulate_ar(trace, true).total_seconds)
    assert ratio(few, "efficient") < 0.8
    assert ratio(many, "efficient") == pytest.approx(1.0)
    assert ratio(many, "sd-always") > 1.1


def test_trace_validates_its_lengths():
    with pytest.raises(ValueError, match="Trace.response_lengths must be a tuple of 2 lengths, one per prompt"):
        Trace(prompt_lengths=(1, 2), response_lengths=(3,))
    with pytest.raises(ValueError, match="Trace.acceptance must be"):
        Trace(prompt_lengths=(1,), response_lengths=(3,), acceptance=(1.5,))
