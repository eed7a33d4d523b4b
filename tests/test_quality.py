import json

import pytest

from verl_efficientrollout.cli import main
from verl_efficientrollout.quality import QualityConfig, run_quality


@pytest.mark.parametrize(
    "kwargs, field",
    [({"recipes": ("int4-g48",)}, "drafter recipe"), ({"num_problems": 0}, "num_problems"),
     ({"temperatures": (0.0,)}, "temperatures"), ({"batch_sizes": (0,)}, "batch_sizes")],
)
def test_bad_quality_settings_are_rejected_before_any_work(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QualityConfig(**kwargs)


def test_cli_reports_bad_input_with_exit_code_2(capsys, tmp_path):
    assert main(["quality", "--recipes", "int3", "--out", str(tmp_path)]) == 2
    assert "drafter recipe must be one of int4-g32" in capsys.readouterr().err
    assert main(["quality", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "local Hugging Face model directory" in capsys.readouterr().err
    assert not (tmp_path / "quality.json").exists()


@pytest.mark.model
def test_quality_report_on_the_default_model_writes_json_and_png(tmp_path):
    config = QualityConfig(
        recipes=("int4-g32", "int4-g64"), temperatures=(1.0,), num_problems=1, samples_per_problem=2,
        max_new_tokens=12, batch_sizes=(1, 2), repeats=1,
    )
    report = run_quality(config, tmp_path)
    assert json.loads((tmp_path / "quality.json").read_text())["recipes"][0]["recipe"] == "int4-asym-g32"
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    on_grid, off_grid = report["recipes"]
    assert 0.9 < on_grid["acceptance"]["1.0"] <= 1.0  # the default model sits on the group-32 grid
    assert off_grid["acceptance"]["1.0"] < on_grid["acceptance"]["1.0"]
    assert on_grid["tokens_scored"]["1.0"] == sum(report["responses"]["1.0"])
    assert [c["batch"] for c in on_grid["step_costs"]] == [1, 2]
    assert all(c["target_ms"] > 0 and c["draft_ms"] > 0 and c["verify_ms"] > 0 for c in on_grid["step_costs"])
    assert on_grid["drafter"]["drafter_bytes"] < on_grid["drafter"]["target_bytes"] / 3
