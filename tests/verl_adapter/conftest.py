"""Fixtures of the veRL adapter tests: they need verl (installed by scripts/setup_env.sh)."""

from __future__ import annotations

import pytest

pytest.importorskip("verl", reason="the veRL adapter tests need verl==0.9.1 (pip install 'verl-efficientrollout[verl]')")


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    from verl_efficientrollout.models import default_model_dir

    return str(default_model_dir())


@pytest.fixture(scope="session")
def make_settings():
    return _make_settings


@pytest.fixture(scope="session")
def chat_prompts():
    return _chat_prompts


def _make_settings(model_dir: str, controller: dict | None = None, response_length: int = 48, **overrides):
    from verl_efficientrollout.config import EfficientRolloutConfig
    from verl_efficientrollout.verl_adapter.config import ServerSettings

    efficient = EfficientRolloutConfig.from_dict({
        "drafter": "int4-g32",
        "controller": controller or {"preset": "sd-always", "gamma": 4},
        "native": {"dtype": "float32", "device": "cpu", "max_model_len": 512},
    })
    return ServerSettings(model_path=model_dir, efficient=efficient, prompt_length=256,
                          response_length=response_length, seed=0, **overrides)


def _chat_prompts(count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from verl_efficientrollout.data import chat_prompt_ids, math_problems
    from verl_efficientrollout.models import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    return [list(chat_prompt_ids(tokenizer, problem)) for problem in math_problems()[:count]]
