"""Shared fixtures: a small seeded Llama made here, and the default model (converted once per machine)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llama():
    """A random-init 2-layer Llama (vocab 256, hidden 64) in float32; seeded, no download."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def default_model():
    """(bf16 target, tokenizer) of the default model, SmolLM2-135M-Instruct."""
    from verl_efficientrollout.models import load_target

    return load_target("default", dtype="bfloat16")


# scripts/test.sh names the tier it runs; a tier must have its stack, never skip it silently.
TIER_REQUIRES = {"core": ("verl",), "vllm": ("vllm",)}


def pytest_configure(config):
    import importlib
    import os

    tier = os.environ.get("VERL_EFFICIENTROLLOUT_TIER")
    for module in TIER_REQUIRES.get(tier, ()):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise pytest.UsageError(f"test tier {tier!r} needs {module}, which does not import: {exc}") from exc


@pytest.fixture(scope="session")
def load_example():
    """Import a script under examples/ by its path (examples are not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    def load(relative: str):
        path = Path(__file__).resolve().parents[1] / "examples" / relative
        name = f"example_{path.stem}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses look their module up here
            spec.loader.exec_module(module)
        return sys.modules[name]

    return load
