"""Fixtures of the SGLang backend tests. The engine tests need SGLang (the sglang tier,
``.venv-sglang``: sglang 0.5.12 on this CPU with the import shims of ``cpu_shims/``); engines are
shared across a module where they can be (about 9 s per start-up on 2 cores)."""

from __future__ import annotations

import os

import pytest

from verl_efficientrollout.config import EfficientRolloutConfig
from verl_efficientrollout.sglang_backend.compat import platform_env

# Before any test imports SGLang: it reads its CPU switch once, at import (compat.check_cpu_engine).
os.environ.update(platform_env())

# The tier's engines run in float32: greedy output compared token for token (the same batch twice,
# before and after a weight update) is not reproducible in bf16 on every CPU (on a Sapphire Rapids
# with AMX the same batch decoded twice by one bf16 engine differed at a near-tie).
TEST_DTYPE = "float32"


def sglang_test_config(sglang=None, **controller) -> EfficientRolloutConfig:
    """The default model on SGLang (float32) with the int4-asym-g32 drafter, short contexts, 8 rows."""
    return EfficientRolloutConfig.from_dict({
        "engine": "sglang", "drafter": "int4-g32", "controller": controller,
        "sglang": {"dtype": TEST_DTYPE, "max_model_len": 512, "max_num_seqs": 8, "max_total_tokens": 8192,
                   **(sglang or {})}})


@pytest.fixture(scope="session")
def sglang_config():
    """``sglang_config(sglang=None, **controller)``: an ``EfficientRolloutConfig`` as these tests use."""
    return sglang_test_config


@pytest.fixture(scope="session")
def prompts(math_prompts) -> list[tuple[int, ...]]:
    return math_prompts[:4]
