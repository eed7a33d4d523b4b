import math

import pytest

from verl_efficientrollout.controller import (
    CostModel,
    CostProfile,
    StepCost,
    bundled_profiles,
    expected_output_tokens,
    load_profile,
    predicted_speedup,
    save_profile,
)


def constant(seconds):
    return StepCost(0, 0, 0, 0, bandwidth=1, flops_rate=1, overhead_s=seconds)


def test_step_time_is_max_of_memory_and_compute_plus_overheads():
    c = StepCost(100, 2, 10, 1, bandwidth=10, flops_rate=20, overhead_s=0.5, row_overhead_s=0.25)
    # bytes = 100 + 50 * 2 = 200 -> 20 s; flops = 3 * (4 * 10 + 50 * 1) = 270 -> 13.5 s
    assert c.time(4, 50, 3) == pytest.approx(20 + 0.5 + 4 * 0.25)
    # flops = 9 * (90) = 810 -> 40.5 s beats memory
    assert c.time(4, 50, 9) == pytest.approx(40.5 + 1.5)


def test_step_cost_rejects_zero_bandwidth():
    with pytest.raises(ValueError, match="StepCost.bandwidth must be"):
        StepCost(1, 1, 1, 1, bandwidth=0, flops_rate=1)


def test_expected_output_tokens_counts_the_bonus_token():
    assert expected_output_tokens((0.8, 0.8), 2) == pytest.approx(2.44)
    assert expected_output_tokens((0.8,), 2) == pytest.approx(2.44)  # last value repeats
    assert expected_output_tokens((0.5, 1.0), 3) == pytest.approx(1 + 0.5 + 0.5 + 0.5)
    assert expected_output_tokens((1.0,), 4) == 5.0
    assert expected_output_tokens((0.9,), 0) == 1.0


def test_predicted_speedup_divides_by_draft_and_verify_cost():
    assert predicted_speedup((0.8,), 2, r=0.5, v=1.1) == pytest.approx(2.44 / 2.1)


def test_ratios_with_constant_costs():
    profile = CostProfile("c", "test", target=constant(1.0), draft=constant(0.25))
    assert CostModel(profile).ratios(batch=3, total_context=100, gamma=4) == (0.25, 1.0)


def test_refinement_moves_the_factor_toward_measured_over_predicted():
    model = CostModel(load_profile("cpu-smollm2-135m"), refine_rate=0.1)
    predicted = model.target_time(2, 512)
    factors = []
    for _ in range(60):
        model.observe("target", 2, 512, 2 * predicted)
        factors.append(model.factor("target", 2))
    assert factors[0] == pytest.approx(2**0.1)
    assert all(a < b < 2.0 for a, b in zip(factors, factors[1:]))
    assert factors[-1] == pytest.approx(2.0, rel=0.01)
    assert model.target_time(3, 512) == pytest.approx(model.factor("target", 2) * model.profile.target.time(3, 512))
    assert model.factor("target", 4) == 1.0  # other buckets untouched
    # Draft and verify forwards not measured yet keep the profile's ratio to the target step ...
    assert model.factor("verify", 2) == model.factor("draft", 2) == model.factor("target", 2)
    ratios = model.ratios(2, 512, 4)
    assert ratios == pytest.approx(CostModel(model.profile).ratios(2, 512, 4))
    # ... until measured: then from there, on their own.
    model.observe("verify", 2, 512, model.profile.target.time(2, 512, 5), gamma=4)  # as the bare profile predicts
    assert model.factor("verify", 2) == pytest.approx(2.0 ** 0.9, rel=0.01)
    assert model.factor("target", 2) == pytest.approx(2.0, rel=0.01)


def test_refinement_rate_zero_keeps_the_profile():
    model = CostModel(load_profile("cpu-smollm2-135m"), refine_rate=0.0)
    model.observe("verify", 8, 2048, 10.0, gamma=4)
    assert model.factor("verify", 8) == 1.0


def test_one_outlier_moves_the_factor_by_at_most_a_clipped_step():
    model = CostModel(load_profile("cpu-smollm2-135m"), refine_rate=0.1)
    model.observe("draft", 1, 256, 1000.0)  # a compile, say
    assert model.factor("draft", 1) == pytest.approx(10**0.1)


def test_profile_save_load_round_trip(tmp_path):
    profile = load_profile("cpu-smollm2-135m")
    path = tmp_path / "mine.json"
    save_profile(profile, path)
    assert load_profile(path) == profile
    assert load_profile(str(path)) == profile
    assert CostProfile.from_dict(profile.to_dict()) == profile


def test_unknown_profile_name_lists_the_bundled_ones():
    assert "cpu-smollm2-135m" in bundled_profiles()
    with pytest.raises(ValueError, match="unknown cost profile 'gpu-nope'.*cpu-smollm2-135m"):
        load_profile("gpu-nope")


def test_profile_from_dict_rejects_unknown_keys():
    d = load_profile("cpu-smollm2-135m").to_dict()
    with pytest.raises(ValueError, match="unknown keys"):
        CostProfile.from_dict({**d, "extra": 1})


# research/cpu.md, lean decode step, context 256 per row, ms
LEAN_TABLE = {  # batch: (target 1 token, verify 5 tokens, int4 draft 1 token)
    1: (32, 34, 18),
    4: (44, 48, 32),
    16: (110, 140, 104),
    64: (340, 410, 370),
}


@pytest.mark.parametrize("batch", sorted(LEAN_TABLE))
def test_bundled_cpu_profile_reproduces_the_measured_lean_steps(batch):
    model = CostModel(load_profile("cpu-smollm2-135m"))
    ctx = 256 * batch
    predicted = (model.target_time(batch, ctx), model.verify_time(batch, ctx, 4), model.draft_time(batch, ctx))
    for p, measured_ms in zip(predicted, LEAN_TABLE[batch]):
        assert math.isclose(p * 1e3, measured_ms, rel_tol=0.35), (batch, p * 1e3, measured_ms)


def test_bundled_cpu_profile_says_speculation_pays_at_batch_1_not_64():
    model = CostModel(load_profile("cpu-smollm2-135m"))
    best = lambda b: max(predicted_speedup((0.95,), g, *model.ratios(b, 256 * b, g)) for g in range(1, 9))
    assert best(1) > 1.3
    assert best(64) < 1.0


def test_calibrate_makes_the_prediction_equal_the_measurement_for_that_batch_bucket():
    from verl_efficientrollout.controller import CostModel, load_profile

    model = CostModel(load_profile("cpu-smollm2-135m"), refine_rate=0.1)
    model.calibrate("verify", 4, 4 * 300, 0.25, gamma=4)
    assert model.verify_time(4, 4 * 300, 4) == pytest.approx(0.25)
    assert model.verify_time(5, 5 * 300, 4) != pytest.approx(0.25)  # same bucket, scaled by the roofline
    assert model.target_time(4, 4 * 300) == pytest.approx(CostModel(model.profile).target_time(4, 4 * 300))
    with pytest.raises(ValueError, match="CostModel.seconds must be"):
        model.calibrate("target", 1, 10, 0.0)


def test_fit_profile_recovers_a_device_from_its_measured_step_times():
    from verl_efficientrollout.controller import CostModel, StepCost, fit_profile, load_profile

    base = load_profile("cpu-smollm2-135m")
    import dataclasses

    slow_device = dataclasses.replace(  # a compute-starved CPU: verify costs grow with tokens
        base, target=dataclasses.replace(base.target, bandwidth=4e9, flops_rate=8e10, overhead_s=0.02,
                                         row_overhead_s=0.0),
        draft=dataclasses.replace(base.draft, bandwidth=4e9, flops_rate=2e10, overhead_s=0.015, row_overhead_s=0.0),
    )
    truth = CostModel(slow_device, refine_rate=0.0)
    measured = []
    for batch in (1, 2, 4, 8, 16):
        ctx = batch * 200
        measured.append({"kind": "target", "batch": batch, "total_context": ctx, "gamma": 0,
                         "seconds": truth.target_time(batch, ctx)})
        measured.append({"kind": "draft", "batch": batch, "total_context": ctx, "gamma": 0,
                         "seconds": truth.draft_time(batch, ctx)})
        for gamma in (2, 6):
            measured.append({"kind": "verify", "batch": batch, "total_context": ctx, "gamma": gamma,
                             "seconds": truth.verify_time(batch, ctx, gamma)})
    fitted = CostModel(fit_profile(measured, base, "fitted", "test"), refine_rate=0.0)
    for batch, gamma in ((1, 4), (4, 8), (12, 3), (32, 4)):  # incl. points that were not measured
        ctx = batch * 200
        assert fitted.verify_time(batch, ctx, gamma) == pytest.approx(truth.verify_time(batch, ctx, gamma), rel=0.15)
        assert fitted.draft_time(batch, ctx) == pytest.approx(truth.draft_time(batch, ctx), rel=0.15)
    with pytest.raises(ValueError, match="at least 3 measured step times"):
        fit_profile(measured[:2], base, "x", "y")


@pytest.mark.parametrize("structure", ["draft-model", "native"])
def test_fit_profile_recovers_vllms_step_costs_from_whole_steps(structure):
    """vLLM times a step only as a whole: with vLLM's draft model (structure ``draft-model``) the
    drafter runs in every step, with our self-drafter (``native``) only in speculative ones.
    Fitted on plain steps and whole steps at gammas 1, 2, 4, 8, the profile predicts both at other
    batches and draft lengths (how a step splits between the target's and the drafter's forwards
    is loosely determined; the toggle only needs whole steps)."""
    import dataclasses

    from verl_efficientrollout.controller import fit_profile

    base = load_profile("cpu-smollm2-135m")
    device = dataclasses.replace(
        base, structure=structure,
        target=dataclasses.replace(base.target, bandwidth=5e9, flops_rate=6e10, overhead_s=0.01),
        draft=dataclasses.replace(base.draft, bandwidth=8e9, flops_rate=3e10, overhead_s=0.012),
    )
    truth = CostModel(device, refine_rate=0.0)

    def whole_step(model, batch, ctx, gamma):
        return gamma * model.draft_time(batch, ctx) + model.verify_time(batch, ctx, gamma)

    if structure == "draft-model":
        assert truth.target_time(1, 300) == pytest.approx(device.target.time(1, 300) + device.draft.time(1, 300, 2))
        assert whole_step(truth, 1, 300, 3) == pytest.approx(
            device.target.time(1, 300, 4) + device.draft.time(1, 300, 4) + 2 * device.draft.time(1, 300))
    else:
        assert truth.target_time(1, 300) == pytest.approx(device.target.time(1, 300))
        assert whole_step(truth, 1, 300, 3) == pytest.approx(device.target.time(1, 300, 4) + 3 * device.draft.time(1, 300))
    measured = []
    for batch in (1, 2, 4, 8, 16):
        ctx = batch * 300
        measured.append({"kind": "target", "batch": batch, "total_context": ctx, "gamma": 0,
                         "seconds": truth.target_time(batch, ctx)})
        measured += [{"kind": "step", "batch": batch, "total_context": ctx, "gamma": gamma,
                      "seconds": whole_step(truth, batch, ctx, gamma)} for gamma in (1, 2, 4, 8)]
    profile = fit_profile(measured, base, "fitted", "test", structure)
    fitted = CostModel(profile, refine_rate=0.0)
    assert profile.structure == structure
    for batch, gamma in ((1, 3), (4, 6), (12, 2), (2, 8)):
        ctx = batch * 300
        assert whole_step(fitted, batch, ctx, gamma) == pytest.approx(whole_step(truth, batch, ctx, gamma), rel=0.1)
        assert fitted.target_time(batch, ctx) == pytest.approx(truth.target_time(batch, ctx), rel=0.1)


def test_a_whole_speculative_step_corrects_draft_and_verify_together_and_not_the_plain_step():
    model = CostModel(load_profile("cpu-smollm2-135m"), refine_rate=1.0)
    plain = model.target_time(4, 4 * 200)
    predicted = 3 * model.draft_time(4, 4 * 200) + model.verify_time(4, 4 * 200, 3)
    model.observe_step(4, 4 * 200, 3, 2 * predicted)
    assert 3 * model.draft_time(4, 4 * 200) + model.verify_time(4, 4 * 200, 3) == pytest.approx(2 * predicted)
    assert model.factor("draft", 4) == pytest.approx(2.0) and model.factor("verify", 4) == pytest.approx(2.0)
    assert model.target_time(4, 4 * 200) == pytest.approx(plain)
    assert model.factor("draft", 16) == 1.0  # other batch buckets keep the profile
    frozen = CostModel(load_profile("cpu-smollm2-135m"), refine_rate=0.0)
    frozen.observe_step(4, 800, 3, 10.0)
    assert frozen.factor("draft", 4) == 1.0


def test_auto_profile_is_the_bundled_profile_of_each_engine():
    from verl_efficientrollout.controller import resolve_profile

    assert load_profile("auto").name == "cpu-smollm2-135m-fp32"
    assert load_profile("auto", engine="vllm").name == "cpu-smollm2-135m-vllm-bf16"
    assert resolve_profile("my.json", engine="vllm") == "my.json"
    with pytest.raises(ValueError, match="no default cost profile for engine 'sglang'"):
        resolve_profile("auto", engine="sglang")
