"""The metrics reference documents exactly the keys the code reports, and docs/metrics.md carries it."""

from pathlib import Path

from verl_efficientrollout.cli import main
from verl_efficientrollout.engine.base import RequestOutput, RolloutResult
from verl_efficientrollout.metrics import DOC_END, DOC_PAGE, DOC_START, ROLLOUT_SUMMARY, metrics_markdown


def test_rollout_summary_reports_exactly_the_documented_keys():
    result = RolloutResult(outputs=[RequestOutput("a", [1, 2, 3], "stop")], seconds=1.5,
                           steps=[(1, True, 2, 0.5, 2), (1, False, 0, 0.2, 0)],
                           drafted_per_position=[1, 1], accepted_per_position=[1, 1])
    summary = result.summary()
    assert set(summary) == set(ROLLOUT_SUMMARY)
    assert summary["mean_acceptance_length"] == 3.0 and summary["gamma_histogram"] == {0: 1, 2: 1}


def test_the_metrics_page_carries_the_current_metrics_reference(capsys):
    page = (Path(__file__).parents[1] / DOC_PAGE).read_text()
    assert page.count(DOC_START) == 1 and page.count(DOC_END) == 1, f"{DOC_PAGE} must hold the markers once"
    block = page.split(DOC_START, 1)[1].split(DOC_END, 1)[0].strip()
    assert block == metrics_markdown(), f"{DOC_PAGE} is stale: paste `efficient-rollout metrics-reference` into it"
    assert main(["metrics-reference"]) == 0
    assert capsys.readouterr().out.strip() == metrics_markdown()
