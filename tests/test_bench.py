import json

import pytest

from verl_efficientrollout.bench import BenchConfig, format_bench, oracle_bound, run_bench, tail_shares
from verl_efficientrollout.controller import CostModel, CostProfile, StepCost


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"modes": ("sd-always",)}, "must include 'ar'"),
        ({"against": "sglang"}, r"BenchConfig.against must be one of '', 'vllm'"),
        ({"against": "vllm", "engine": "vllm"}, r"BenchConfig.against='vllm' compares the native engine"),
        ({"vllm_dtype": "int8"}, r"BenchConfig.vllm_dtype must be one of 'float32', 'bfloat16', 'float16'"),
        ({"modes": ("ar", "fast")}, r"BenchConfig.modes must be a selection of ar, sd-always, .* for engine native"),
        ({"modes": ("ar", "draft-model")}, r"BenchConfig.modes must be a selection of .*efficient for engine native"),
        ({"workload": "chat"}, r"BenchConfig.workload must be one of 'grpo', 'math', 'short'"),
        ({"top_p": 0.0}, r"BenchConfig.top_p must be a number > 0.0 and <= 1.0"),
        ({"top_p": 1.5}, r"BenchConfig.top_p must be a number > 0.0 and <= 1.0"),
        ({"workload": "short", "prompts": 5}, r"BenchConfig.prompts must be"),
        ({"drafter": "int2"}, "drafter recipe must be one of"),
        ({"prompts": -1}, r"BenchConfig.prompts must be"),
        ({"workload": "grpo", "prompts": 33}, r"BenchConfig.prompts must be"),
        ({"repeats": -1}, r"BenchConfig.repeats must be"),
        ({"perturbations": (0.0,)}, r"BenchConfig.perturbations must be"),
        ({"engine": "sglang"}, r"BenchConfig.engine must be one of 'native', 'vllm'"),
        ({"dtype": "int8"}, r"BenchConfig.dtype must be one of 'auto', 'float32'"),
    ],
)
def test_bad_bench_settings_fail_before_any_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BenchConfig(**kwargs)


def test_modes_default_to_every_mode_of_the_engine():
    assert BenchConfig().modes == ("ar", "sd-always", "threshold", "paper", "efficient")
    assert BenchConfig(engine="vllm").modes == ("ar", "sd-always", "threshold", "paper", "efficient", "draft-model")


def test_auto_dtype_is_left_to_the_native_engine_to_measure_and_is_bfloat16_for_vllm():
    assert BenchConfig().dtype == "auto"  # NativeEngine measures fp32 and bf16 at start-up
    assert BenchConfig(engine="vllm").dtype == "bfloat16"
    assert BenchConfig(engine="vllm", dtype="float16").dtype == "float16"


def test_the_default_workload_is_grpo_and_each_workload_brings_its_own_size_cap_and_sampling():
    grpo = BenchConfig()
    assert (grpo.workload, grpo.prompts, grpo.samples, grpo.max_new_tokens, grpo.temperature, grpo.top_p,
            grpo.repeats) == ("grpo", 8, 2, 1024, 1.0, 0.9, 1)
    old = BenchConfig(workload="math")
    assert (old.prompts, old.samples, old.max_new_tokens, old.temperature, old.top_p, old.repeats) == (
        4, 4, 256, 1.0, 1.0, 2)
    mine = BenchConfig(workload="math", prompts=2, max_new_tokens=64, temperature=0.5, top_p=0.8)
    assert (mine.prompts, mine.samples, mine.max_new_tokens, mine.temperature, mine.top_p) == (2, 4, 64, 0.5, 0.8)


def test_tail_shares_count_steps_and_wall_time_at_or_below_each_active_batch_size():
    # (batch, speculated, gamma, seconds) per decode step: 16 rows for 1 s, 8 for 2 s, 3 for 3 s, 1 for 4 s
    steps = [(16, False, 0, 1.0), (8, False, 0, 2.0), (3, True, 4, 3.0), (1, True, 4, 4.0)]
    shares = tail_shares(steps)
    assert shares["<=2"] == {"steps": 0.25, "seconds": 0.4}
    assert shares["<=4"] == {"steps": 0.5, "seconds": 0.7}
    assert shares["<=8"] == {"steps": 0.75, "seconds": 0.9}


def _flat_costs(target: float, draft: float, verify_per_token: float) -> CostModel:
    """Costs independent of batch and context: verify of g+1 tokens = (g+1) * verify_per_token."""
    def cost(seconds_per_token: float, overhead: float) -> StepCost:
        return StepCost(weight_bytes=0, kv_bytes_per_token=0, flops_per_token=seconds_per_token,
                        attn_flops_per_context_token=0, bandwidth=1, flops_rate=1, overhead_s=overhead)

    profile = CostProfile("flat", "test", target=cost(verify_per_token, target - verify_per_token),
                          draft=cost(1e-9, draft))
    return CostModel(profile, refine_rate=0.0)


def test_oracle_bound_is_one_when_speculation_cannot_pay_and_below_one_when_it_can():
    expensive = _flat_costs(target=1.0, draft=1.0, verify_per_token=0.9)  # drafting costs a full step
    assert oracle_bound([10], [100], 0.99, expensive) == pytest.approx(1.0)
    cheap = _flat_costs(target=1.0, draft=0.1, verify_per_token=0.01)
    assert oracle_bound([10], [100], 0.95, cheap) < 0.5


@pytest.mark.model
def test_bench_runs_every_mode_side_by_side_and_writes_json_and_png(tmp_path):
    config = BenchConfig(prompts=1, samples=2, max_new_tokens=8, repeats=1, perturbations=(0.25,))
    report = run_bench(config, tmp_path)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert set(saved["modes"]) == {"ar", "sd-always", "threshold", "paper", "efficient"}
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert report["modes"]["ar"]["ratio_vs_ar"] == 1.0
    assert report["modes"]["ar"]["runs"][0]["speculated_share"] == 0.0
    assert report["modes"]["sd-always"]["runs"][0]["speculated_share"] == 1.0
    for mode in report["modes"].values():
        assert [len(run["response_lengths"]) for run in mode["runs"]] == [2]
    assert 0.0 < report["oracle_bound"] <= 1.0
    (update,) = report["stale_vs_rebuilt"]
    assert 0.0 <= update["stale_drafter"] <= 1.0 and 0.0 <= update["rebuilt_drafter"] <= 1.0
    assert "oracle bound" in format_bench(report)
    shape = report["workload_shape"]
    lengths = report["modes"]["ar"]["runs"][0]["response_lengths"]
    assert shape["truncated_share"] <= sum(n == 8 for n in lengths) / 2  # a truncated row has all 8 tokens
    assert set(shape["tail"]) == {"<=2", "<=4", "<=8"}
    assert shape["tail"]["<=2"]["steps"] == 1.0  # two rows: every step is in the tail
    assert "of rows truncated at the cap" in format_bench(report)


def test_oracle_bound_never_exceeds_plain_decoding_when_rows_end_inside_a_speculative_step():
    # Per step, gamma 8 at acceptance 0.95 pays about 3.6x here, but a one-token response gains
    # one token from a 1.88 s speculative step against 1 s of plain decoding.
    cheap = _flat_costs(target=1.0, draft=0.1, verify_per_token=0.01)
    assert oracle_bound([10], [1], 0.95, cheap) == pytest.approx(1.0)
