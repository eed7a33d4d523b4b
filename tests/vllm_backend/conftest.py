"""Engines shared by the vLLM-tier modules (one start-up each, about 40 s on 2 cores)."""

from __future__ import annotations

import pytest

from verl_efficientrollout.config import EfficientRolloutConfig

SHARED_GAMMA = 3  # test_vllm_engine.GAMMA
# The tier's engines run in float32. In bf16 vLLM is not batch-invariant: a verify forward of K + 1
# tokens per row rounds differently from a 1-token step (another GEMM shape), and so does plain vLLM
# across batch compositions, so a greedy near-tie can flip on some CPUs (it did on CI's and on a
# Sapphire Rapids); in float32 such differences sit far below any real logit margin, so token-for-token
# identity is a test of the speculation, not of the rounding. The benchmarks run bf16.
TEST_DTYPE = "float32"


def vllm_test_config(**controller) -> EfficientRolloutConfig:
    """The default model on vLLM (float32) with the int4-asym-g32 drafter, short contexts, 16 rows."""
    return EfficientRolloutConfig.from_dict({"engine": "vllm", "drafter": "int4-g32", "controller": controller,
                                             "vllm": {"dtype": TEST_DTYPE, "max_model_len": 512, "max_num_seqs": 16}})


@pytest.fixture(scope="session")
def vllm_config():
    """``vllm_config(**controller)``: an ``EfficientRolloutConfig`` as the shared engines use."""
    return vllm_test_config


@pytest.fixture(scope="session")
def prompts(math_prompts) -> list[tuple[int, ...]]:
    return math_prompts


@pytest.fixture(scope="session")
def speculative(model_dir, plain):
    """vLLM with the int4 self-drafter at a fixed K (tests that change its weights restore them).
    Started after ``plain``: vLLM's process-wide Prometheus registry then holds this engine's
    counters, until a test starts another engine."""
    from verl_efficientrollout.vllm_backend.engine import VLLMEngine

    engine = VLLMEngine(model_dir, vllm_test_config(preset="sd-always", gamma=SHARED_GAMMA))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def plain(model_dir):
    """Plain vLLM: the baseline every speculative output is compared with."""
    from verl_efficientrollout.vllm_backend.engine import VLLMEngine

    engine = VLLMEngine(model_dir, vllm_test_config(preset="ar"))
    yield engine
    engine.close()
