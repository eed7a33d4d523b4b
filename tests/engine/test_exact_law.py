"""The native engine's speculative output follows the target's exact law at every output position.

A tiny random Llama (vocab 32, one layer) is small enough to enumerate: the law of each of the first five
output tokens is computed from plain decoding's own probabilities (the target's logits for every
possible prefix, 32^4 of them for the fifth token), then processed with the row's temperature / top-k /
top-p. The engine speculates with gamma 3 on rows of 5 new tokens: token 1 comes from the prefill,
tokens 2-4 are draft positions of the first round and token 5 is its bonus token (or a token of the
next round after a rejection), so every draft position and the bonus token are checked.

Each check is Pearson's chi-square test of ``ROWS`` sampled tokens against the exact law, at level
``ALPHA`` (30 checks in a run: family-wise false-alarm rate 3e-4). Power, from ``stats.chi2_power``: a
law at total variation ``eps`` from the exact one gives the statistic a noncentrality of at least
``4 * ROWS * eps^2`` (Cauchy-Schwarz); with ``ROWS = 2^17``, ``eps = 0.02`` less the pooled categories'
mass (< 0.002) and at most 31 degrees of freedom that is >= 170, and the power at level 1e-5 is > 0.999.
Each test asserts that figure for its own pooled mass and degrees of freedom, and a guard that the
drafter's law is far from the target's (expected total variation > 0.1 at the first draft position),
without which a bug in the residual could not show. The mutation checks inject four known bugs
(``verl_efficientrollout._mutations``) and assert that the tests whose setting exposes a bug reject it.
"""

from __future__ import annotations

import pytest
import torch

from verl_efficientrollout._mutations import ENV
from verl_efficientrollout.config import DrafterConfig, EfficientRolloutConfig, SamplingParams
from verl_efficientrollout.controller import Controller, ControllerConfig
from verl_efficientrollout.engine.base import Request
from verl_efficientrollout.engine.model import KVCache
from verl_efficientrollout.engine.native import NativeEngine, NativeEngineConfig
from verl_efficientrollout.sampling import logits_to_probs, sampling_tensors
from verl_efficientrollout.stats import chi2_goodness_of_fit, chi2_power

VOCAB, PROMPT, NEW_TOKENS, GAMMA = 32, (3, 17, 5), 5, 3
ROWS, ALPHA, EPS, MIN_POWER = 1 << 17, 1e-5, 0.02, 0.99
SETTINGS = {  # name -> SamplingParams
    "T0.6": SamplingParams(temperature=0.6),
    "T1.0": SamplingParams(temperature=1.0),
    "T1.5": SamplingParams(temperature=1.5),
    "T1.0-top_k5": SamplingParams(temperature=1.0, top_k=5),
    "T1.0-top_p0.8": SamplingParams(temperature=1.0, top_p=0.8),
    "T1.5-top_k8-top_p0.9": SamplingParams(temperature=1.5, top_k=8, top_p=0.9),
}
# The bugs and the settings that expose them (temperature twice is invisible at 1.0, top-p without top-p).
MUTATIONS = [
    ("no-residual", "T1.0"), ("no-residual", "T1.5-top_k8-top_p0.9"),
    ("residual-of-next-draft", "T1.0"), ("residual-of-next-draft", "T1.5-top_k8-top_p0.9"),
    ("temperature-twice", "T0.6"), ("temperature-twice", "T1.5"),
    ("top-p-draft-only", "T1.0-top_p0.8"), ("top-p-draft-only", "T1.5-top_k8-top_p0.9"),
]


@pytest.fixture(scope="module")
def tiny_model():
    """Vocab 32, one layer, large initial weights (peaked laws, and an int4 drafter far from them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, initializer_range=0.3,
    )
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    return model


def _engine(model, decode_graphs: str) -> NativeEngine:
    return NativeEngine(model, EfficientRolloutConfig(drafter=DrafterConfig.from_name("int4-g32")),
                        NativeEngineConfig(dtype="float32", max_model_len=32, decode_graphs=decode_graphs))


@pytest.fixture(scope="module")
def engine(tiny_model):
    """The eager path at exact shapes (the CPU default)."""
    return _engine(tiny_model, "off")


def _last_logits(module, sequences: torch.Tensor) -> torch.Tensor:  # [n, length] -> [n, vocab]
    """The module's logits after each whole sequence (fresh KV cache, chunks of 2^15 rows)."""
    n, length = sequences.shape
    out = torch.empty(n, VOCAB)
    for start in range(0, n, 1 << 15):
        chunk = sequences[start:start + (1 << 15)]
        cache = KVCache(module.args, len(chunk), length, torch.float32)
        positions = torch.arange(length).expand(len(chunk), -1)
        out[start:start + len(chunk)] = module(chunk, positions, cache, torch.arange(len(chunk)),
                                               output_index=torch.full((len(chunk),), length - 1))[:, 0]
    return out


def _prefixes(generated: int) -> torch.Tensor:  # [VOCAB ** generated, len(PROMPT) + generated]
    index = torch.arange(VOCAB ** generated)
    tokens = [(index // VOCAB ** (generated - 1 - j)) % VOCAB for j in range(generated)]  # the last one fastest
    return torch.cat([torch.tensor(PROMPT).expand(len(index), -1), *(t[:, None] for t in tokens)], 1)


@pytest.fixture(scope="module")
def target_logits(engine) -> list[torch.Tensor]:
    """The target's next-token logits after every prefix: level k is [VOCAB ** k, vocab], k = 0..4."""
    with torch.inference_mode():
        return [_last_logits(engine.target, _prefixes(k)) for k in range(NEW_TOKENS)]


def _processed(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:  # [n, vocab] -> [n, vocab]
    return logits_to_probs(logits, *sampling_tensors([params] * len(logits)))


def exact_laws(target_logits: list[torch.Tensor], params: SamplingParams) -> list[torch.Tensor]:
    """The law of output token k (k = 1..5) under plain decoding with ``params``: [vocab] each."""
    laws, prefix_probs = [], torch.ones(1, dtype=torch.float64)
    for logits in target_logits:
        conditional = _processed(logits, params).double()  # [VOCAB ** k, vocab]
        joint = prefix_probs[:, None] * conditional
        laws.append(joint.sum(0))
        prefix_probs = joint.reshape(-1)
    return laws


def draft_distance(engine, target_logits: list[torch.Tensor], params: SamplingParams) -> float:
    """Expected total variation between the drafter's and the target's law at the first draft position
    (output token 2), the drafter running as in the engine: on the KV the target wrote for the prompt."""
    sequences = _prefixes(1)
    with torch.inference_mode():
        cache = KVCache(engine.target.args, VOCAB, sequences.shape[1], torch.float32)
        positions = torch.arange(sequences.shape[1]).expand(VOCAB, -1)
        engine.target(sequences[:, :-1], positions[:, :-1], cache, torch.arange(VOCAB))
        draft = engine.drafter.module(sequences[:, -1:], positions[:, -1:], cache, torch.arange(VOCAB))[:, 0]
    first = _processed(target_logits[0], params)[0]  # [vocab]
    distance = 0.5 * (_processed(draft, params) - _processed(target_logits[1], params)).abs().sum(-1)  # [vocab]
    return float(first @ distance)


def p_values(engine, target_logits, params: SamplingParams, seed: int) -> list[float]:
    """One rollout of ``ROWS`` rows; the p-value of each output position against its exact law (and
    the power assertion for each)."""
    controller = Controller(ControllerConfig.preset("sd-always", gamma=GAMMA, gamma_max=GAMMA))
    result = engine.generate([Request(PROMPT, NEW_TOKENS, params)] * ROWS, seed=seed, controller=controller)
    assert controller.stats.speculated_steps > 0 and max(o.num_draft_tokens for o in result.outputs) >= GAMMA
    tokens = torch.tensor([o.token_ids for o in result.outputs])  # [ROWS, NEW_TOKENS]
    out = []
    for position, law in enumerate(exact_laws(target_logits, params)):
        counts = torch.bincount(tokens[:, position], minlength=VOCAB).tolist()
        test = chi2_goodness_of_fit(counts, law.tolist())
        assert chi2_power(test.dof, 4 * ROWS * (EPS - test.pooled_mass) ** 2, ALPHA) >= MIN_POWER, position
        out.append(test.p_value)
    return out


@pytest.mark.parametrize("setting", SETTINGS)
def test_every_output_position_follows_the_targets_exact_law(engine, target_logits, setting, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    params = SETTINGS[setting]
    assert draft_distance(engine, target_logits, params) > 0.1  # the drafter is far enough to expose a bug
    values = p_values(engine, target_logits, params, seed=1)
    assert min(values) > ALPHA, values


@pytest.mark.parametrize("setting", ["T0.6", "T1.5-top_k8-top_p0.9"])
def test_the_padded_decode_path_follows_the_exact_law_too(tiny_model, target_logits, setting, monkeypatch):
    """The padded path (the CUDA-graph shapes, run eagerly here): 2^17 rows, padded batch buckets."""
    monkeypatch.delenv(ENV, raising=False)
    padded = _engine(tiny_model, "padded")
    assert padded.runner.mode == "padded"
    assert min(p_values(padded, target_logits, SETTINGS[setting], seed=3)) > ALPHA


@pytest.mark.parametrize("bug, setting", MUTATIONS)
def test_each_injected_bug_is_rejected(engine, target_logits, bug, setting, monkeypatch):
    """The mutation check: with the bug injected, some output position fails its exact law."""
    monkeypatch.setenv(ENV, bug)
    values = p_values(engine, target_logits, SETTINGS[setting], seed=2)
    assert min(values) < ALPHA, values
