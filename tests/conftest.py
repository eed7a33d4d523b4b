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
def model_dir() -> str:
    """The default model's local HF directory (converted once per machine)."""
    from verl_efficientrollout.models import default_model_dir

    return str(default_model_dir())


@pytest.fixture(scope="session")
def math_prompts(model_dir) -> list[tuple[int, ...]]:
    """The first 8 bundled math problems in the default model's chat template."""
    from transformers import AutoTokenizer

    from verl_efficientrollout.data import chat_prompt_ids, math_problems

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tuple(chat_prompt_ids(tokenizer, p)) for p in math_problems()[:8]]


@pytest.fixture(scope="session")
def original_weights(model_dir):
    """The default model's HF state dict in float32 (what a weight update restores)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()


@pytest.fixture(scope="module")
def run():
    """One event loop per module for an in-process rollout server: its events and batcher task live on it."""
    import asyncio

    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    for task in asyncio.all_tasks(loop):  # the server's idle batcher
        task.cancel()
        loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
    loop.close()


async def _serve(server, requests) -> list:
    """The requests as verl's agent loop sends them: one call each, concurrently (one batch)."""
    import asyncio

    return await asyncio.gather(*(server.submit(r) for r in requests))


async def _send_weights(server, weights: dict, global_steps: int) -> dict:
    """What verl's weight sender drives: begin, buckets of 64 tensors, commit."""
    await server.begin_weights()
    items = list(weights.items())
    for i in range(0, len(items), 64):
        await server.receive_weights(items[i:i + 64])
    return await server.commit_weights(global_steps)


@pytest.fixture(scope="session")
def verl_calls():
    """``verl_calls.serve(server, requests)`` and ``verl_calls.send_weights(server, weights, global_steps)``:
    the calls verl's agent loop and weight sender make on a rollout server (coroutines)."""
    from types import SimpleNamespace

    return SimpleNamespace(serve=_serve, send_weights=_send_weights)


@pytest.fixture(scope="session")
def sampler_p_values(model_dir):
    """``sampler_p_values(reference, engine)``: two-sample tests of ``engine`` against ``reference``
    (engines with ``generate``), 48 rows each at temperature 1 on four short-answer prompts that end
    at EOS: a KS test on response lengths (40-token cap) and chi-square tests on the tokens at
    positions 1-3 per prompt (position 0 comes from the prefill, the next ones from verify steps);
    compare each p-value with 0.01 / 4 (Bonferroni). A drafter bug of the kind research/vllm.md
    records (median length 237 -> 90) is far outside what they accept: tests/test_stats.py shows
    that they reject shifts of that size at these sample sizes."""
    from transformers import AutoTokenizer

    from verl_efficientrollout.config import SamplingParams
    from verl_efficientrollout.data import SHORT_ANSWER_QUESTIONS, chat_ids
    from verl_efficientrollout.engine.base import Request
    from verl_efficientrollout.stats import same_sampler_p_values

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tuple(chat_ids(tokenizer, question)) for question in SHORT_ANSWER_QUESTIONS]
    samples = 12

    def rollout(engine, seed: int) -> list[list[int]]:
        requests = [Request(p, 40, SamplingParams(1.0)) for p in prompts for _ in range(samples)]
        return [o.token_ids for o in engine.generate(requests, seed=seed).outputs]

    return lambda reference, engine: same_sampler_p_values(rollout(reference, 100), rollout(engine, 200), samples)


@pytest.fixture(scope="session")
def assert_refuses_unservable_requests():
    """``assert_refuses_unservable_requests(engine, prompt)``: a batch of a good request, one with a
    token id beyond the default model's vocabulary and one beyond a 512-token context: the two
    bad ones fail alone, naming why, and the good one is served."""
    from verl_efficientrollout.config import SamplingParams
    from verl_efficientrollout.engine.base import Request

    def check(engine, prompt) -> None:
        requests = [Request(prompt, 4, SamplingParams(0.0), "ok"), Request((1, 10**6), 4, SamplingParams(0.0), "vocab"),
                    Request(prompt * 8, 4, SamplingParams(0.0), "long")]
        ok, vocab, long = engine.generate(requests).outputs
        assert ok.finish_reason in ("stop", "length") and len(ok.token_ids) > 0
        assert vocab.finish_reason == "error" and "vocab size 49152" in vocab.error
        assert long.finish_reason == "error" and "max_model_len 512" in long.error

    return check


@pytest.fixture(scope="session")
def default_model():
    """(bf16 target, tokenizer) of the default model, SmolLM2-135M-Instruct."""
    from verl_efficientrollout.models import load_target

    return load_target("default", dtype="bfloat16")


# scripts/test.sh names the tier it runs; a tier must have its stack, never skip it silently.
TIER_REQUIRES = {"core": ("verl",), "vllm": ("vllm", "verl"), "sglang": ("sglang",)}


def pytest_configure(config):
    import importlib
    import os

    tier = os.environ.get("VERL_EFFICIENTROLLOUT_TIER")
    for module in TIER_REQUIRES.get(tier, ()):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise pytest.UsageError(f"test tier {tier!r} needs {module}, which does not import: {exc}") from exc
    if tier == "core":  # what the native engine's CPU tests would otherwise skip
        import shutil

        from verl_efficientrollout.engine.model import onednn_linear_ops

        compiler = os.environ.get("CXX") or "c++"
        if shutil.which(compiler) is None:
            raise pytest.UsageError(f"test tier 'core' needs a C++ compiler ({compiler!r}, or set CXX) for the "
                                    "native engine's CPU decode ops (tests/engine/test_cpu_kernels.py)")
        if onednn_linear_ops() is None:
            raise pytest.UsageError("test tier 'core' needs torch's oneDNN linear ops (tests/engine/test_model.py): "
                                    "install the torch build of requirements/cpu-core.txt")


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
