"""The configuration reference comes from the validators themselves and docs/configuration.md's copy is current."""

from pathlib import Path

from verl_efficientrollout.cli import main
from verl_efficientrollout.config import NativeEngineConfig
from verl_efficientrollout.config_reference import DOC_END, DOC_PAGE, DOC_START, allowed_values, reference_markdown
from verl_efficientrollout.controller import ControllerConfig


def test_allowed_values_are_the_validators_own_words():
    assert allowed_values(ControllerConfig, "toggle") == "one of 'off', 'always', 'threshold', 'roofline', 'paper'"
    assert allowed_values(ControllerConfig, "margin") == "a number >= 1.0"
    assert allowed_values(NativeEngineConfig, "device") == "one of auto, cpu, cuda, cuda:N"


def test_every_field_of_every_section_is_listed():
    text = reference_markdown()
    for key in ("engine", "recipe", "group_size", "toggle", "gamma_max", "paper_ladder", "device",
                "max_num_seqs", "cpu_kv_cache_gib"):
        assert f"| `{key}` |" in text


def test_the_configuration_page_carries_the_current_reference():
    page = (Path(__file__).parents[1] / DOC_PAGE).read_text()
    assert page.count(DOC_START) == 1 and page.count(DOC_END) == 1, f"{DOC_PAGE} must hold the markers once"
    block = page.split(DOC_START, 1)[1].split(DOC_END, 1)[0].strip()
    assert block == reference_markdown(), f"{DOC_PAGE} is stale: paste `efficient-rollout config-reference` into it"


def test_the_cli_prints_it(capsys):
    assert main(["config-reference"]) == 0
    assert capsys.readouterr().out.strip() == reference_markdown()
