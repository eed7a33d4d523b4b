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
