import pytest

from verl_efficientrollout.config import DrafterConfig, SamplingParams


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be"):
        SamplingParams(**kwargs)


def test_temperature_zero_is_greedy():
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams().greedy


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        ({"recipe": "int3"}, "recipe", "'int4', 'int8'"),
        ({"group_size": 48}, "group_size", "32, 64, 128, 256"),
        ({"backend": "tpu"}, "backend", "'auto', 'cpu', 'cuda'"),
    ],
)
def test_invalid_drafter_config_names_field_and_allowed_values(kwargs, field, allowed):
    with pytest.raises(ValueError, match=rf"DrafterConfig\.{field} must be one of") as info:
        DrafterConfig(**kwargs)
    assert allowed in str(info.value)


@pytest.mark.parametrize(
    "name, recipe, group_size",
    [("int4-g32", "int4", 32), ("int4-asym-g64", "int4", 64), ("INT4-G128", "int4", 128), ("int8", "int8", 32)],
)
def test_recipe_names_parse_and_round_trip(name, recipe, group_size):
    config = DrafterConfig.from_name(name)
    assert (config.recipe, config.group_size) == (recipe, group_size)
    assert DrafterConfig.from_name(config.name) == config


@pytest.mark.parametrize("name", ["int4", "int4-g48", "int4-sym-g32", "fp8", ""])
def test_unknown_recipe_name_lists_the_allowed_ones(name):
    with pytest.raises(ValueError, match="int4-g32, int4-g64, int4-g128, int4-g256, int8"):
        DrafterConfig.from_name(name)


def test_shipped_yaml_configs_build_frozen_configs():
    from pathlib import Path

    import yaml

    from verl_efficientrollout.config import EfficientRolloutConfig

    configs = {p.stem: p for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")}
    assert {"efficient", "ar_baseline", "paper", "sd_always"} <= set(configs)
    built = {name: EfficientRolloutConfig.from_dict(yaml.safe_load(p.read_text())) for name, p in configs.items()}
    assert (built["efficient"].controller.toggle, built["efficient"].controller.draft_length) == ("roofline", "adaptive")
    assert built["ar_baseline"].controller.toggle == "off"
    assert built["paper"].controller.paper_ladder == (5, 7, 9, 11)
    assert built["sd_always"].controller.toggle == "always"
    assert built["efficient"].drafter.name == "int4-asym-g32"


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"engine": "tensorrt"}, r"EfficientRolloutConfig\.engine must be one of 'native'"),
        ({"drafter": {"bits": 4}}, r"DrafterConfig got unknown keys \['bits'\]"),
        ({"controller": {"gamma": 0}}, r"ControllerConfig\.gamma_min|ControllerConfig\.gamma must be"),
        ({"controller": {"preset": "fast"}}, r"ControllerConfig\.preset must be one of"),
        ({"controller": {"margin": 0.9}}, r"ControllerConfig\.margin must be"),
        ({"speculate": True}, r"unknown keys \['speculate'\]"),
    ],
)
def test_bad_rollout_config_fails_when_built_naming_the_field(mapping, message):
    from verl_efficientrollout.config import EfficientRolloutConfig

    with pytest.raises(ValueError, match=message):
        EfficientRolloutConfig.from_dict(mapping)
