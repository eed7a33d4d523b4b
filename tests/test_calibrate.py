"""``efficient-rollout calibrate`` on the default model with a small grid."""

import pytest

from verl_efficientrollout.calibrate import CalibrateConfig, validate
from verl_efficientrollout.controller import Controller, ControllerConfig, CostModel, load_profile


@pytest.mark.parametrize("kwargs, message", [
    ({"contexts": (64,)}, "CalibrateConfig.contexts must hold at least two lengths"),
    ({"batches": ()}, "CalibrateConfig.batches must be a non-empty list"),
    ({"gammas": (0,)}, r"CalibrateConfig.gammas must be an integer >= 1"),
    ({"dtype": "fp8"}, "CalibrateConfig.dtype must be one of"),
    ({"name": "a/b"}, "CalibrateConfig.name must be a file stem"),
    ({"batches": (1, 4), "contexts": (32, 96)}, "at least 3 step sizes to fit"),
    ({"engine": "sglang"}, "CalibrateConfig.engine must be one of 'native', 'vllm'"),
    ({"engine": "vllm", "device": "cuda:1"}, "CalibrateConfig.device must be one of auto, cpu, cuda with engine vllm"),
    ({"gammas": (2, 9)}, r"CalibrateConfig.gammas must be integers in \[1, 8\]"),
])
def test_bad_calibration_settings_fail_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CalibrateConfig(**kwargs)


def test_validation_counts_a_decision_that_the_prediction_gets_wrong():
    """Measured: drafting is free, so speculation pays; a profile that thinks drafts cost 10
    target steps decides the other way every time."""
    profile = load_profile("cpu-smollm2-135m")
    model = CostModel(profile, refine_rate=0.0)
    context = 100
    rows = [{"kind": "target", "batch": 1, "total_context": context, "gamma": 0, "seconds": 0.010},
            {"kind": "draft", "batch": 1, "total_context": context, "gamma": 0, "seconds": 1e-6},
            {"kind": "verify", "batch": 1, "total_context": context, "gamma": 2, "seconds": 0.010}]
    model.calibrate("draft", 1, context, 0.1)  # predicted draft step 10x the measured target step
    model.calibrate("target", 1, context, 0.010)
    model.calibrate("verify", 1, context, 0.010, gamma=2)
    report = validate(model, rows, gammas=(2,))
    assert report["decisions"] == 3 and report["decision_agreement"] == 0.0
    assert report["rows"][1]["error"] > 1000


def test_auto_dtype_is_left_to_the_native_engine_to_measure_and_is_bfloat16_for_vllm():
    assert CalibrateConfig().dtype == "auto"
    assert CalibrateConfig(engine="vllm").dtype == "bfloat16"


def test_validation_of_whole_speculative_steps_decides_as_the_measurement():
    """vLLM's kind ``step`` (drafts + verify timed as one): at 1 row a step of 2 drafts costs 1.2
    plain steps, so it pays at every acceptance level; a profile that agrees scores 100%."""
    model = CostModel(load_profile("cpu-smollm2-135m"), refine_rate=0.0)
    context = 100
    model.calibrate("target", 1, context, 0.010)
    model.calibrate("verify", 1, context, 0.010, gamma=2)
    model.calibrate("draft", 1, context, 0.001)
    rows = [{"kind": "target", "batch": 1, "total_context": context, "gamma": 0, "seconds": 0.010},
            {"kind": "step", "batch": 1, "total_context": context, "gamma": 2, "seconds": 0.012}]
    report = validate(model, rows, gammas=(2,))
    assert report["decisions"] == 3 and report["decision_agreement"] == 1.0
    assert report["rows"][1]["predicted_seconds"] == pytest.approx(0.012)


@pytest.mark.model
def test_calibrate_writes_a_profile_the_controller_loads_and_reports_validation(tmp_path, capsys):
    from verl_efficientrollout.cli import main

    assert main(["calibrate", "--batches", "1,2,4", "--contexts", "32,96", "--gammas", "2", "--repeats", "1",
                 "--name", "tiny", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "validation on the held-out context 96" in out and "| verify | 4 | 2 |" in out
    assert (tmp_path / "tiny.calibration.json").is_file()
    profile = load_profile(tmp_path / "tiny.json")
    assert profile.name == "tiny" and profile.target.bandwidth > 0
    controller = Controller(ControllerConfig(profile=str(tmp_path / "tiny.json")))
    assert controller.cost_model.profile.name == "tiny"
