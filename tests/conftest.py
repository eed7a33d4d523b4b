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


@pytest.fixture
def signal_on_progress(monkeypatch):
    """``signal_on_progress(engine, progress) -> threading.Event``: ``engine.generate`` wrapped so that
    its abort poll sets the event once ``progress(requests)()`` (built per batch) says the batch has
    made progress: abort tests trigger on observed progress, never after a sleep. A batch that ends
    first sets it too, so the test's assertions fail instead of hanging."""
    import threading

    def wrap(engine, progress) -> threading.Event:
        event, generate = threading.Event(), engine.generate

        def generate_and_signal(requests, seed=0, controller=None, should_abort=None):
            progressed = progress(requests)

            def poll():
                if progressed():
                    event.set()
                return should_abort()

            try:
                return generate(requests, seed, controller, poll)
            finally:
                event.set()

        monkeypatch.setattr(engine, "generate", generate_and_signal)
        return event

    return wrap


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
    compare each p-value with 0.01 / 4 (Bonferroni). A smoke test on the real model and prompts, with
    little power: at 48 rows the KS test has about 3% power against a 30% length shift and about 69%
    against the 237 -> 90 median-length bug research/vllm.md records. The tests with power are the
    exact-law tests on a vocab-32 model (tests/engine/test_exact_law.py, tests/vllm_backend/
    test_vllm_exact_law.py)."""
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


class ExactLaw:
    """Exact laws of a tiny-vocabulary model's first output tokens, and the tests against them
    (``tests/engine/test_exact_law.py`` says why they are exact and how much power they have).

    ``target_logits``: the target's next-token logits after every prefix of 0..levels-1 generated tokens
    (level k is ``[vocab ** k, vocab]``, the last generated token varying fastest), each level's rows
    decoded one token at a time on copies of the parents' KV cache (32^4 prefixes in seconds)."""

    @staticmethod
    def tiny_llama(hidden: int, heads: int, layers: int = 1, vocab: int = 32):
        """A seeded random Llama with large initial weights (peaked laws; an int4 copy far from them), no EOS."""
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
            initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
        model = LlamaForCausalLM(config).eval().requires_grad_(False)
        model.generation_config.eos_token_id = model.generation_config.bos_token_id = None
        return model

    @staticmethod
    def target_logits(module, prompt: tuple[int, ...], levels: int) -> list:
        """``module``: a native-engine model (``NativeEngine.target``) holding the target's weights."""
        import torch

        from verl_efficientrollout.engine.model import KVCache

        vocab, length, chunk = module.args.vocab_size, len(prompt) + levels, 1 << 15
        with torch.inference_mode():
            cache = KVCache(module.args, 1, length, torch.float32)
            levels_out = [module(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache, torch.arange(1),
                                 output_index=torch.tensor([len(prompt) - 1]))[:, 0]]
            for k in range(1, levels):
                position, rows = len(prompt) + k - 1, vocab ** k
                logits = torch.empty(rows, vocab)
                kept = KVCache(module.args, rows, length, torch.float32) if k < levels - 1 else None
                for start in range(0, rows, chunk):
                    children = torch.arange(start, min(start + chunk, rows))
                    scratch = KVCache(module.args, len(children), length, torch.float32)
                    scratch.k[:, :, :, :position] = cache.k[:, children // vocab, :, :position]
                    scratch.v[:, :, :, :position] = cache.v[:, children // vocab, :, :position]
                    logits[children] = module((children % vocab)[:, None], torch.full((len(children), 1), position),
                                              scratch, torch.arange(len(children)))[:, 0]
                    if kept is not None:
                        kept.k[:, children], kept.v[:, children] = scratch.k, scratch.v
                levels_out.append(logits)
                cache = kept
        return levels_out

    @staticmethod
    def laws(target_logits: list, params) -> list:
        """The law of output token k+1 (k = 0..levels-1) under plain decoding with ``params``: [vocab] float64."""
        import torch

        from verl_efficientrollout.sampling import logits_to_probs, sampling_tensors

        laws, prefix_probs = [], torch.ones(1, dtype=torch.float64)
        for logits in target_logits:
            conditional = logits_to_probs(logits, *sampling_tensors([params] * len(logits))).double()
            joint = prefix_probs[:, None] * conditional  # [prefixes, vocab]
            laws.append(joint.sum(0))
            prefix_probs = joint.reshape(-1)
        return laws

    @staticmethod
    def p_values(tokens, laws: list, eps: float, alpha: float, min_power: float) -> list[float]:
        """``tokens`` [rows, positions]: the p-value of each output position against its exact law, after
        asserting that the test has ``min_power`` against a law ``eps`` away in total variation."""
        import torch

        from verl_efficientrollout.stats import chi2_goodness_of_fit, chi2_power

        out = []
        for position, law in enumerate(laws):
            counts = torch.bincount(tokens[:, position], minlength=len(law)).tolist()
            test = chi2_goodness_of_fit(counts, law.tolist())
            power = chi2_power(test.dof, 4 * len(tokens) * (eps - test.pooled_mass) ** 2, alpha)
            assert power >= min_power, (position, power)
            out.append(test.p_value)
        return out


@pytest.fixture(scope="session")
def exact_law() -> type[ExactLaw]:
    return ExactLaw
