import pytest

from verl_efficientrollout.controller import PRESETS, ControllerConfig


def test_defaults_are_the_efficient_preset():
    c = ControllerConfig()
    assert (c.toggle, c.draft_length) == ("roofline", "adaptive")
    assert ControllerConfig.preset("efficient") == c


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"gamma": 0}, "gamma"),
        ({"margin": 0.99}, "margin"),
        ({"threshold_batch_size": -1}, "threshold_batch_size"),
        ({"toggle": "sometimes"}, "toggle"),
        ({"draft_length": "long"}, "draft_length"),
        ({"gamma_min": 5, "gamma_max": 3, "gamma": 4}, "gamma_max"),
        ({"gamma": 9}, "gamma"),
        ({"off_margin": 1.2}, "off_margin"),
        ({"off_margin": 0.0}, "off_margin"),
        ({"acceptance_decay": 0.0}, "acceptance_decay"),
        ({"prior_acceptance": 1.0}, "prior_acceptance"),
        ({"paper_ladder": (5, 5, 7)}, "paper_ladder"),
        ({"paper_ladder": ()}, "paper_ladder"),
        ({"ladder_down": 0.95}, "ladder_down"),
        ({"ladder_patience": 0}, "ladder_patience"),
        ({"refine_rate": 1.5}, "refine_rate"),
        ({"min_dwell_steps": 2.5}, "min_dwell_steps"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"ControllerConfig\.{field} must be"):
        ControllerConfig(**overrides)


def test_unknown_toggle_error_lists_the_allowed_values():
    with pytest.raises(ValueError, match="'off', 'always', 'threshold', 'roofline', 'paper'"):
        ControllerConfig(toggle="maybe")


def test_from_dict_rejects_unknown_keys_and_lists_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown keys \['gama'\].*allowed keys: toggle, draft_length, gamma"):
        ControllerConfig.from_dict({"gama": 3})


def test_from_dict_turns_lists_into_tuples():
    c = ControllerConfig.from_dict({"toggle": "paper", "draft_length": "ladder", "paper_ladder": [3, 5]})
    assert c.paper_ladder == (3, 5)
    assert c.longest_draft == 8


def test_draft_lengths_are_the_ks_each_draft_length_policy_can_schedule():
    assert ControllerConfig(draft_length="fixed", gamma=5).draft_lengths == (5,)
    assert ControllerConfig(draft_length="adaptive", gamma_min=2, gamma_max=4, gamma=3).draft_lengths == (2, 3, 4)
    assert ControllerConfig(draft_length="ladder", paper_ladder=(3, 7)).draft_lengths == (3, 7)


def test_presets_build_valid_configs_and_unknown_preset_fails():
    for name in PRESETS:
        ControllerConfig.preset(name)
    assert ControllerConfig.preset("paper", margin=1.1).margin == 1.1
    with pytest.raises(ValueError, match="ControllerConfig.preset must be one of"):
        ControllerConfig.preset("fastest")
