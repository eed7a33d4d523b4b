import math

import torch

from verl_efficientrollout.config import SamplingParams
from verl_efficientrollout.sampling import logits_to_probs, sample, sampling_tensors


def _params(batch, temperature=1.0, top_k=0, top_p=1.0):
    def row(value):
        return value if isinstance(value, list) else [value] * batch

    return (
        torch.tensor(row(temperature), dtype=torch.float32),
        torch.tensor(row(top_k), dtype=torch.int64),
        torch.tensor(row(top_p), dtype=torch.float32),
    )


def test_sampling_tensors_builds_per_row_tensors():
    params = [SamplingParams(), SamplingParams(temperature=0.0, top_k=5, top_p=0.9)]
    temperature, top_k, top_p = sampling_tensors(params, "cpu")
    assert temperature.dtype == torch.float32 and temperature.tolist() == [1.0, 0.0]
    assert top_k.dtype == torch.int64 and top_k.tolist() == [0, 5]
    assert top_p.dtype == torch.float32 and torch.allclose(top_p, torch.tensor([1.0, 0.9]))


def test_temperature_zero_gives_one_hot_on_argmax_with_lowest_index_ties():
    logits = torch.tensor([[[0.1, 3.0, 3.0, -1.0], [5.0, 0.0, 5.0, 1.0]], [[0.0, 1.0, 2.0, 3.0]] * 2])
    probs = logits_to_probs(logits, *_params(2, temperature=[0.0, 1.0]))  # [batch, positions, vocab]
    assert probs.shape == (2, 2, 4) and probs.dtype == torch.float32
    assert probs[0].tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    assert torch.allclose(probs[1], logits[1].softmax(-1))


def test_temperature_scales_logits_before_softmax():
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    probs = logits_to_probs(logits, *_params(3, temperature=[0.5, 1.0, 2.0]))
    expected = (logits / torch.tensor([[0.5], [1.0], [2.0]])).softmax(-1)
    assert torch.allclose(probs, expected, atol=1e-6)


def test_top_k_keeps_exactly_k_tokens_per_row_and_zero_keeps_all():
    logits = torch.randn(4, 3, 50, generator=torch.Generator().manual_seed(1))
    probs = logits_to_probs(logits, *_params(4, top_k=[1, 5, 0, 50]))
    assert (probs > 0).sum(-1).tolist() == [[1] * 3, [5] * 3, [50] * 3, [50] * 3]
    top5 = logits[1].topk(5, dim=-1)
    assert torch.allclose(probs[1].gather(-1, top5.indices), top5.values.softmax(-1), atol=1e-6)
    assert torch.allclose(probs[2], logits[2].softmax(-1), atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(4, 3))


def test_top_p_keeps_smallest_nucleus():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(5, 4)
    probs = logits_to_probs(logits, *_params(5, top_p=[0.7, 0.8, 0.81, 0.96, 1.0]))
    assert (probs > 0).sum(-1).tolist() == [2, 2, 3, 4, 4]
    assert torch.allclose(probs[0], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.allclose(probs[2], torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)


def test_top_p_always_keeps_the_top_token():
    logits = torch.tensor([[0.4, 0.35, 0.25]]).log()
    assert logits_to_probs(logits, *_params(1, top_p=1e-6)).tolist() == [[1.0, 0.0, 0.0]]


def test_top_p_applies_to_mass_renormalised_after_top_k():
    # top-k 2 leaves [4/7, 3/7]; 4/7 >= 0.5, so top-p keeps one token (without top-k: two).
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 2).log()
    probs = logits_to_probs(logits, *_params(2, top_k=[2, 0], top_p=0.5))
    assert (probs > 0).sum(-1).tolist() == [1, 2]


def test_sample_never_draws_a_zero_probability_token():
    generator = torch.Generator().manual_seed(2)
    probs = torch.zeros(1000, 64)
    probs[:, ::7] = torch.rand(1000, 10, generator=generator)
    probs[:, 63] = 1e-30  # tiny but positive: may be drawn
    draws = sample(probs, generator)
    assert bool((probs.gather(1, draws[:, None]) > 0).all())


def test_sample_returns_the_only_positive_token_for_one_hot_rows():
    probs = torch.nn.functional.one_hot(torch.tensor([3, 0, 9]), 10).float()
    assert sample(probs, torch.Generator().manual_seed(0)).tolist() == [3, 0, 9]


def test_sample_is_deterministic_when_seeded():
    probs = torch.rand(256, 32, generator=torch.Generator().manual_seed(3))
    first = sample(probs, torch.Generator().manual_seed(7))
    second = sample(probs, torch.Generator().manual_seed(7))
    other = sample(probs, torch.Generator().manual_seed(8))
    assert torch.equal(first, second) and first.dtype == torch.int64
    assert not torch.equal(first, other)


def test_sample_histogram_matches_probs():
    num_draws, vocab = 200_000, 10
    probs = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05, 0.03, 0.02, 0.0])
    draws = sample(probs.expand(num_draws, vocab), torch.Generator().manual_seed(4))
    histogram = torch.bincount(draws, minlength=vocab).float() / num_draws
    tv = 0.5 * (histogram - probs).abs().sum().item()
    # E[TV] <= 0.5 * sqrt(2 * vocab / (pi * N)) ~= 0.0028 for N = 200k.
    assert tv < 0.01, tv
    assert histogram[-1] == 0
    assert tv < 0.5 * math.sqrt(2 * vocab / (math.pi * num_draws)) + 0.005


def test_sample_of_rows_that_are_not_probabilities_still_returns_token_ids_in_range():
    """A faulty drafter's NaN logits must not turn into an out-of-range index (an embedding
    IndexError on a CPU, a device-side assert on a GPU) before the engine discards its step."""
    probs = torch.tensor([[float("nan")] * 5, [0.0, float("inf"), 1.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.0]])
    tokens = sample(probs, torch.Generator().manual_seed(0))
    assert tokens.shape == (3,) and bool(((tokens >= 0) & (tokens < 5)).all())


def test_host_hints_change_no_probability():
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 3, 50, generator=generator)  # [batch, tokens, vocab]
    temperature = torch.tensor([1.0, 0.7, 1.3, 1.0])  # no greedy row
    for top_k, top_p in [([0] * 4, [1.0] * 4), ([0, 5, 0, 3], [1.0, 0.9, 0.5, 1.0])]:
        top_k, top_p = torch.tensor(top_k), torch.tensor(top_p)
        filtered = bool((top_k > 0).any() or (top_p < 1).any())
        reference = logits_to_probs(logits, temperature, top_k, top_p)
        assert torch.equal(logits_to_probs(logits, temperature, top_k, top_p, filtered, any_greedy=False), reference)
