"""The native engine's speculative output follows the target's exact law at every output position.

A tiny random Llama (vocab 32, one layer) is small enough to enumerate: the law of each of the first five
output tokens is computed from plain decoding's own probabilities (the target's logits for every
possible prefix, 32^4 of them for the fifth token), then processed with the row's temperature / top-k /
top-p. The engine speculates with gamma 3 on rows of 5 new tokens: token 1 comes from the prefill,
tokens 2-4 are draft positions of the first round and token 5 is its bonus token (or a token of the
next round after a rejection), so every draft position and the bonus token are checked.

Each check is Pearson's chi-square test of ``ROWS`` sampled tokens against the exact law, at level
``ALPHA`` (40 checks in a run, 8 tests of 5 positions: family-wise false-alarm rate 4e-4). Power, from ``stats.chi2_power``: a
law at total variation ``eps`` from the exact one gives the statistic a noncentrality of at least
``4 * ROWS * eps^2`` (Cauchy-Schwarz); with ``ROWS = 2^17``, ``eps = 0.02`` less the pooled categories'
mass (< 0.002) and at most 31 degrees of freedom that is >= 170, and the power at level 1e-5 is > 0.999.
Each test asserts that figure for its own pooled mass and degrees of freedom, and a guard that the
drafter's law is far from the target's (expected total variation > 0.1 at the first draft position),
without which a bug in the residual could not show. The mutation checks inject four known bugs
(``verl_efficientrollout._mutations``) and assert that the test of every setting that can expose a bug
rejects it (on an eighth of the rows: those bugs are far larger than ``EPS``).
"""

from __future__ import annotations

import pytest
import torch

from verl_efficientrollout._mutations import BUGS, ENV
from verl_efficientrollout.config import DrafterConfig, EfficientRolloutConfig, SamplingParams
from verl_efficientrollout.controller import Controller, ControllerConfig
from verl_efficientrollout.engine.base import Request
from verl_efficientrollout.engine.model import KVCache
from verl_efficientrollout.engine.native import NativeEngine, NativeEngineConfig
from verl_efficientrollout.sampling import logits_to_probs, sampling_tensors

VOCAB, PROMPT, NEW_TOKENS, GAMMA = 32, (3, 17, 5), 5, 3
ROWS, ALPHA, EPS, MIN_POWER = 1 << 17, 1e-5, 0.02, 0.99
MUTATION_ROWS = ROWS // 8
SETTINGS = {  # name -> SamplingParams
    "T0.6": SamplingParams(temperature=0.6),
    "T1.0": SamplingParams(temperature=1.0),
    "T1.5": SamplingParams(temperature=1.5),
    "T1.0-top_k5": SamplingParams(temperature=1.0, top_k=5),
    "T1.0-top_p0.8": SamplingParams(temperature=1.0, top_p=0.8),
    "T1.5-top_k8-top_p0.9": SamplingParams(temperature=1.5, top_k=8, top_p=0.9),
}
# Each bug with every setting that can expose it: temperature applied twice is invisible at temperature
# 1.0, top-p on one side only without top-p.
MUTATIONS = [(bug, setting) for bug in BUGS for setting, params in SETTINGS.items()
             if (bug != "temperature-twice" or params.temperature != 1.0)
             and (bug != "top-p-draft-only" or params.top_p < 1.0)]


@pytest.fixture(scope="module")
def tiny_model(exact_law):
    """Vocab 32, one layer, hidden 32, large initial weights (peaked laws, and an int4 drafter far from them)."""
    return exact_law.tiny_llama(hidden=32, heads=4)


def _engine(model, decode_graphs: str) -> NativeEngine:
    return NativeEngine(model, EfficientRolloutConfig(drafter=DrafterConfig.from_name("int4-g32")),
                        NativeEngineConfig(dtype="float32", max_model_len=32, decode_graphs=decode_graphs))


@pytest.fixture(scope="module")
def engine(tiny_model):
    """The eager path at exact shapes (the CPU default)."""
    return _engine(tiny_model, "off")


@pytest.fixture(scope="module")
def target_logits(engine, exact_law) -> list[torch.Tensor]:
    """The target's next-token logits after every prefix: level k is [VOCAB ** k, vocab], k = 0..4."""
    return exact_law.target_logits(engine.target, PROMPT, NEW_TOKENS)


def _processed(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:  # [n, vocab] -> [n, vocab]
    return logits_to_probs(logits, *sampling_tensors([params] * len(logits)))


def draft_distance(engine, target_logits: list[torch.Tensor], params: SamplingParams) -> float:
    """Expected total variation between the drafter's and the target's law at the first draft position
    (output token 2), the drafter running as in the engine: on the KV the target wrote for the prompt."""
    sequences = torch.cat([torch.tensor(PROMPT).expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], 1)
    with torch.inference_mode():
        cache = KVCache(engine.target.args, VOCAB, sequences.shape[1], torch.float32)
        positions = torch.arange(sequences.shape[1]).expand(VOCAB, -1)
        engine.target(sequences[:, :-1], positions[:, :-1], cache, torch.arange(VOCAB))
        draft = engine.drafter.module(sequences[:, -1:], positions[:, -1:], cache, torch.arange(VOCAB))[:, 0]
    first = _processed(target_logits[0], params)[0]  # [vocab]
    distance = 0.5 * (_processed(draft, params) - _processed(target_logits[1], params)).abs().sum(-1)  # [vocab]
    return float(first @ distance)


def p_values(engine, target_logits, params: SamplingParams, seed: int, exact_law, rows: int = ROWS,
             min_power: float = MIN_POWER) -> list[float]:
    """One rollout of ``rows`` rows; the p-value of each output position against its exact law (after
    asserting the test's power for each)."""
    controller = Controller(ControllerConfig.preset("sd-always", gamma=GAMMA, gamma_max=GAMMA))
    result = engine.generate([Request(PROMPT, NEW_TOKENS, params)] * rows, seed=seed, controller=controller)
    assert controller.stats.speculated_steps > 0 and max(o.num_draft_tokens for o in result.outputs) >= GAMMA
    tokens = torch.tensor([o.token_ids for o in result.outputs])  # [rows, NEW_TOKENS]
    return exact_law.p_values(tokens, exact_law.laws(target_logits, params), EPS, ALPHA, min_power)


@pytest.mark.parametrize("setting", SETTINGS)
def test_every_output_position_follows_the_targets_exact_law(engine, target_logits, setting, monkeypatch,
                                                             exact_law):
    monkeypatch.delenv(ENV, raising=False)
    params = SETTINGS[setting]
    assert draft_distance(engine, target_logits, params) > 0.1  # the drafter is far enough to expose a bug
    values = p_values(engine, target_logits, params, 1, exact_law)
    assert min(values) > ALPHA, values


@pytest.mark.parametrize("setting", ["T0.6", "T1.5-top_k8-top_p0.9"])
def test_the_padded_decode_path_follows_the_exact_law_too(tiny_model, target_logits, setting, monkeypatch,
                                                          exact_law):
    """The padded path (the CUDA-graph shapes, run eagerly here): 2^17 rows, padded batch buckets."""
    monkeypatch.delenv(ENV, raising=False)
    padded = _engine(tiny_model, "padded")
    assert padded.runner.mode == "padded"
    assert min(p_values(padded, target_logits, SETTINGS[setting], 3, exact_law)) > ALPHA


@pytest.mark.parametrize("bug, setting", MUTATIONS)
def test_each_injected_bug_is_rejected(engine, target_logits, bug, setting, monkeypatch, exact_law):
    """The mutation check: with the bug injected, some output position fails its exact law. On
    ``MUTATION_ROWS`` rows: these bugs move a law by far more than ``EPS`` (at 2^17 rows, in the 8 pairs
    measured, the smallest p-value was below 1e-300), so an eighth of the rows rejects them at the same level."""
    monkeypatch.setenv(ENV, bug)
    values = p_values(engine, target_logits, SETTINGS[setting], 2, exact_law, MUTATION_ROWS, 0.0)
    assert min(values) < ALPHA, values
