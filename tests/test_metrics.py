"""The metrics reference documents exactly the keys the code reports, and the README carries it."""

from pathlib import Path

from verl_efficientrollout.cli import main
from verl_efficientrollout.engine.base import RequestOutput, RolloutResult
from verl_efficientrollout.metrics import README_END, README_START, ROLLOUT_SUMMARY, metrics_markdown


def test_rollout_summary_reports_exactly_the_documented_keys():
    result = RolloutResult(outputs=[RequestOutput("a", [1, 2, 3], "stop")], seconds=1.5,
                           steps=[(1, True, 2, 0.5, 2), (1, False, 0, 0.2, 0)],
                           drafted_per_position=[1, 1], accepted_per_position=[1, 1])
    summary = result.summary()
    assert set(summary) == set(ROLLOUT_SUMMARY)
    assert summary["mean_acceptance_length"] == 3.0 and summary["gamma_histogram"] == {0: 1, 2: 1}


def test_the_readme_carries_the_current_metrics_reference(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split(README_START, 1)[1].split(README_END, 1)[0].strip()
    assert block == metrics_markdown(), "README is stale: paste `efficient-rollout metrics-reference` into it"
    assert main(["metrics-reference"]) == 0
    assert capsys.readouterr().out.strip() == metrics_markdown()
