"""Scripted engine states in, exact decisions out.

The handmade profile makes the cost ratios exact: target and verify steps take 1 s whatever
the batch (v = 1), a draft forward 0.1 + 0.05 * batch s (r = 0.1 + 0.05 * batch). With no
observations the acceptance is the prior, 0.8, so at gamma 1 the predicted speedup is
1.8 / (1.1 + 0.05 * batch): 1.565 at batch 1, 1.059 at 12, 1.029 at 13, 0.973 at 15, 0.857 at 20.
"""

import pytest

from verl_efficientrollout.controller import (
    Controller,
    ControllerConfig,
    CostModel,
    CostProfile,
    EngineState,
    StepCost,
    StepObservation,
)


def handmade_model(draft_overhead=0.1, draft_row_overhead=0.05):
    target = StepCost(0, 0, 0, 0, bandwidth=1, flops_rate=1, overhead_s=1.0)
    draft = StepCost(0, 0, 0, 0, bandwidth=1, flops_rate=1, overhead_s=draft_overhead,
                     row_overhead_s=draft_row_overhead)
    return CostModel(CostProfile("handmade", "test", target, draft), refine_rate=0.0)


def controller(model=None, **overrides):
    config = dict(draft_length="fixed", gamma=1, gamma_min=1, min_dwell_steps=0, prior_acceptance=0.8)
    return Controller(ControllerConfig(**{**config, **overrides}), model or handmade_model())


def run(ctrl, batches, seen=100):
    out = []
    for step, b in enumerate(batches):
        d = ctrl.decide(EngineState(b, 100 * b, step, seen))
        out.append((d.speculate, d.gamma))
    return out


BATCHES = [1, 8, 12, 13, 15, 20, 13, 12, 1]
T, F = (True, 1), (False, 0)


def test_off_never_speculates():
    assert run(controller(toggle="off"), BATCHES) == [F] * 9


def test_always_speculates_every_step_with_the_fixed_gamma():
    assert run(controller(toggle="always", gamma=3), BATCHES) == [(True, 3)] * 9


def test_threshold_speculates_only_at_or_below_batch_limit():
    assert run(controller(toggle="threshold", threshold_batch_size=12), BATCHES) == [T, T, T, F, F, F, F, T, T]


def test_roofline_switches_on_above_margin_and_off_below_off_margin():
    # 13 sits in the band [1.0, 1.05): it keeps whatever state the toggle is in
    assert run(controller(toggle="roofline"), BATCHES) == [T, T, T, T, F, F, F, T, T]


def test_roofline_reports_the_predicted_speedup():
    d = controller(toggle="roofline").decide(EngineState(12, 1200))
    assert d.predicted_speedup == pytest.approx(1.8 / 1.7)
    assert d.reason.startswith("switched on")


def test_roofline_holds_for_min_dwell_steps_after_a_switch():
    got = run(controller(toggle="roofline", min_dwell_steps=2), [1, 20, 20, 20, 1, 1, 1])
    assert got == [T, T, T, F, F, F, T]


def test_each_rollout_starts_with_the_roofline_toggle_off_whatever_the_last_one_ended_with():
    ctrl = controller(toggle="roofline", min_dwell_steps=8)
    assert run(ctrl, [1, 1, 1]) == [T, T, T]  # the tail of a rollout: few rows, on (and held for 8 steps)
    ctrl.begin_rollout()
    assert run(ctrl, [20, 20, 1]) == [F, F, T]  # a new full batch: off at once, on again in its tail


def switches(decisions):
    return sum(a != b for a, b in zip(decisions, decisions[1:]))


def test_hysteresis_band_stops_flipping_when_speedup_oscillates_around_margin():
    got = run(controller(toggle="roofline"), [12, 13] * 20)  # 1.059, 1.029, 1.059, ...
    assert got == [T] * 40


def test_dwell_limits_switches_when_speedup_crosses_the_whole_band_every_step():
    batches = [12, 15] * 20  # 1.059 (>= margin), 0.973 (< off_margin)
    assert switches(run(controller(toggle="roofline"), batches)) == 39
    held = run(controller(toggle="roofline", min_dwell_steps=8), batches)
    assert switches(held) == 4  # at most one switch per 9 steps
    flips = [i for i in range(1, 40) if held[i] != held[i - 1]]
    assert all(b - a > 8 for a, b in zip(flips, flips[1:]))


def test_adaptive_picks_the_goodput_maximising_gamma():
    # acceptance 0.9, r = 0.5, v = 1: speedups 1.267, 1.355, 1.376, 1.365, 1.339 for gamma 1..5
    model = handmade_model(draft_overhead=0.5, draft_row_overhead=0.0)
    ctrl = controller(model, toggle="always", draft_length="adaptive", prior_acceptance=0.9)
    d = ctrl.decide(EngineState(4, 400))
    assert (d.gamma, round(d.predicted_speedup, 4)) == (3, round(3.439 / 2.5, 4))


def test_adaptive_drafts_longer_when_acceptance_is_higher():
    model = handmade_model(draft_overhead=0.5, draft_row_overhead=0.0)
    gamma = lambda a: controller(model, toggle="always", draft_length="adaptive", prior_acceptance=a).decide(
        EngineState(4, 400)).gamma
    assert gamma(0.6) == 1
    assert gamma(0.9) == 3
    assert gamma(0.98) == 8  # capped at gamma_max


def test_low_acceptance_turns_the_roofline_toggle_off():
    ctrl = controller(toggle="roofline", draft_length="adaptive", prior_acceptance=0.3)
    d = ctrl.decide(EngineState(12, 1200))
    assert (d.speculate, d.gamma) == (False, 0)
    assert d.predicted_speedup == pytest.approx(1.3 / 1.7)  # best gamma is 1


def feed_rollout(ctrl, acceptance, steps=50, rows=4):
    """One rollout in which every step speculates and each token is accepted with ``acceptance``."""
    for _ in range(steps):
        d = ctrl.decide(EngineState(rows, 100 * rows, 0, 100))
        drafted, accepted, reach = [], [], float(rows)
        for _ in range(d.gamma):
            drafted.append(reach)
            accepted.append(reach * acceptance)
            reach *= acceptance
        ctrl.observe(StepObservation(d, rows, 100 * rows, tuple(drafted), tuple(accepted)))
    ctrl.begin_rollout()
    return ctrl.decide(EngineState(rows, 100 * rows)).gamma


def test_ladder_moves_up_after_two_good_rollouts_and_down_after_two_bad():
    ctrl = controller(toggle="always", draft_length="ladder")
    ctrl.begin_rollout()
    assert ctrl.decide(EngineState(4, 400)).gamma == 5
    assert [feed_rollout(ctrl, 0.97) for _ in range(4)] == [5, 7, 7, 9]
    assert [feed_rollout(ctrl, 0.80) for _ in range(2)] == [9, 7]


def test_ladder_needs_consecutive_rollouts_and_stays_within_its_rungs():
    ctrl = controller(toggle="always", draft_length="ladder")
    assert [feed_rollout(ctrl, a) for a in (0.97, 0.90, 0.97, 0.80, 0.97)] == [5] * 5
    assert [feed_rollout(ctrl, 0.5) for _ in range(4)] == [5] * 4  # clamped at the first rung
    assert [feed_rollout(ctrl, 0.99) for _ in range(8)][-1] == 11  # and at the last


def test_ladder_ignores_rollouts_without_drafts():
    ctrl = controller(toggle="always", draft_length="ladder")
    feed_rollout(ctrl, 0.97)
    ctrl.begin_rollout()  # nothing drafted: neither breaks nor extends the streak
    assert feed_rollout(ctrl, 0.97) == 7


def test_paper_toggle_waits_for_more_than_min_requests_then_stays_on_for_the_rollout():
    ctrl = controller(toggle="paper", paper_min_requests=32)
    ctrl.begin_rollout()
    states = [(12, 10), (12, 32), (20, 40), (12, 40), (20, 40), (64, 40), (1, 40)]
    got = [ctrl.decide(EngineState(b, 100 * b, i, seen)) for i, (b, seen) in enumerate(states)]
    assert [(d.speculate, d.gamma) for d in got] == [F, F, F, T, T, T, T]
    assert got[1].reason.startswith("waiting")
    ctrl.begin_rollout()  # resets: off again until the prediction clears the margin
    assert run(ctrl, [20, 12, 20], seen=40) == [F, T, T]


def test_paper_toggle_uses_the_previous_rollouts_acceptance_frozen():
    ctrl = controller(toggle="paper", paper_min_requests=0)
    ctrl.begin_rollout()
    assert run(ctrl, [15]) == [F]  # prior 0.8: 1.8 / 1.85 = 0.973
    forced = controller(toggle="always").decide(EngineState(15, 1500))
    for _ in range(200):  # this rollout measures acceptance 1.0
        ctrl.observe(StepObservation(forced, 15, 1500, (15.0,), (15.0,)))
    assert run(ctrl, [15]) == [F]  # still frozen at the prior within this rollout
    ctrl.begin_rollout()
    assert run(ctrl, [15]) == [T]  # now 2.0 / 1.85 = 1.08


def test_controller_stats_count_steps_tokens_and_gamma():
    ctrl = controller(toggle="threshold", threshold_batch_size=4, gamma=2)
    for b in (2, 8, 2):
        d = ctrl.decide(EngineState(b, 100 * b))
        if d.speculate:
            ctrl.observe(StepObservation(d, b, 100 * b, (2, 1), (1, 1)))
        else:
            ctrl.observe(StepObservation(d, b, 100 * b, target_seconds=1.0))
    s = ctrl.stats
    assert (s.steps, s.speculated_steps, s.switches) == (3, 2, 3)
    assert s.gamma_histogram == {2: 2, 0: 1}
    assert (s.drafted_tokens, s.accepted_tokens) == (6, 4)
    assert s.token_acceptance == pytest.approx(4 / 6)
    assert s.mean_acceptance_length == pytest.approx((4 + 4) / 4)


def test_observe_refines_draft_time_per_forward_and_verify_time():
    model = handmade_model()
    model.refine_rate = 1.0
    ctrl = controller(model, toggle="always", gamma=4)
    d = ctrl.decide(EngineState(2, 200))
    ctrl.observe(StepObservation(d, 2, 200, (2, 2, 2, 2), (2, 2, 2, 2), draft_seconds=4 * 0.4, verify_seconds=3.0))
    assert model.factor("draft", 2) == pytest.approx(0.4 / 0.2)
    assert model.factor("verify", 2) == pytest.approx(3.0)


def test_a_speculative_step_timed_as_a_whole_makes_speculation_look_dearer():
    """vLLM times draft + verify as one step: a step measured at twice its prediction halves the
    predicted speedup of that batch bucket, and the toggle follows."""
    model = handmade_model()
    model.refine_rate = 1.0
    ctrl = controller(model, toggle="roofline", gamma=1)
    d = ctrl.decide(EngineState(2, 200))
    assert d.speculate and d.predicted_speedup == pytest.approx(1.8 / 1.2)
    ctrl.observe(StepObservation(d, 2, 200, step_seconds=2 * 1.2))  # no verified drafts: acceptance unchanged
    assert ctrl.decide(EngineState(2, 200)).predicted_speedup == pytest.approx(1.8 / 2.4)
    assert not ctrl.decide(EngineState(2, 200)).speculate


def test_from_config_accepts_a_mapping():
    ctrl = Controller.from_config({"toggle": "paper", "draft_length": "ladder"})
    assert ctrl.config.toggle == "paper"
    assert ctrl.decide(EngineState(64, 64 * 300)).speculate is False
