import math

import pytest
import torch

from verl_efficientrollout.rejection import (
    PLACEHOLDER_TOKEN_ID,
    rejection_sample,
    rejection_sample_reference,
    speculative_sample,
)
from verl_efficientrollout.sampling import logits_to_probs, sample

P = PLACEHOLDER_TOKEN_ID
VOCAB = 10


def _greedy(drafts, target_argmax):
    """Run greedy rows: ``drafts[b]`` drafted, target argmax ``target_argmax[b]`` (len + 1)."""
    batch, max_gamma = len(drafts), max(len(d) for d in drafts)
    draft_ids = torch.full((batch, max_gamma), P, dtype=torch.int64)
    target_ids = torch.zeros((batch, max_gamma + 1), dtype=torch.int64)
    for b, (draft, target) in enumerate(zip(drafts, target_argmax)):
        assert len(target) == len(draft) + 1
        draft_ids[b, : len(draft)] = torch.tensor(draft, dtype=torch.int64)
        target_ids[b, : len(target)] = torch.tensor(target)
    num_draft = torch.tensor([len(d) for d in drafts])
    draft_probs = torch.nn.functional.one_hot(draft_ids.clamp(min=0), VOCAB).float()
    target_probs = torch.nn.functional.one_hot(target_ids, VOCAB).float() * 0.5 + 0.05  # argmax = target
    output, num_accepted = rejection_sample(
        draft_ids, num_draft, draft_probs, target_probs, torch.Generator().manual_seed(0),
        greedy=torch.ones(batch, dtype=torch.bool),
    )
    return output.tolist(), num_accepted.tolist()


def test_greedy_perfect_match_emits_bonus():
    assert _greedy([[1, 2, 3]], [[1, 2, 3, 4]]) == ([[1, 2, 3, 4]], [3])


def test_greedy_early_mismatch_emits_target_argmax():
    assert _greedy([[1, 2, 3]], [[1, 5, 3, 4]]) == ([[1, 5, P, P]], [1])


def test_greedy_first_token_mismatch():
    assert _greedy([[1, 2, 3]], [[7, 2, 3, 4]]) == ([[7, P, P, P]], [0])


def test_greedy_empty_draft_emits_bonus_only():
    assert _greedy([[]], [[4]]) == ([[4]], [0])
    assert _greedy([[1, 2], []], [[1, 2, 3], [4]]) == ([[1, 2, 3], [4, P, P]], [2, 0])


def test_greedy_ragged_batch_mixes_all_cases():
    drafts = [[1, 2, 3], [1, 2, 3], [1, 2, 3], [], [6, 6], [9]]
    target = [[1, 2, 3, 4], [1, 5, 3, 4], [7, 2, 3, 4], [4], [6, 6, 8], [0, 1]]
    assert _greedy(drafts, target) == (
        [[1, 2, 3, 4], [1, 5, P, P], [7, P, P, P], [4, P, P, P], [6, 6, 8, P], [0, P, P, P]],
        [3, 1, 0, 0, 2, 0],
    )


def test_greedy_rows_ignore_the_seed_and_match_argmax_of_logits():
    generator = torch.Generator().manual_seed(1)
    target_logits = torch.randn(6, 4, VOCAB, generator=generator)
    draft_ids = target_logits[:, :3].argmax(-1)
    draft_ids[1, 1] = (draft_ids[1, 1] + 1) % VOCAB  # row 1 diverges at position 1
    draft_logits = torch.randn(6, 3, VOCAB, generator=generator)
    temperature = torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    args = (draft_ids, torch.tensor([3, 3, 3, 0, 2, 1]), draft_logits, target_logits, temperature)
    off = (torch.zeros(6, dtype=torch.int64), torch.ones(6))
    runs = [speculative_sample(*args, *off, torch.Generator().manual_seed(s)) for s in range(5)]
    greedy = temperature == 0
    argmax = target_logits.argmax(-1)
    for output, num_accepted in runs:
        assert torch.equal(output[greedy], runs[0][0][greedy])
        assert num_accepted[greedy].tolist() == [3, 1, 0, 1]
    assert runs[0][0][0].tolist() == argmax[0].tolist()
    assert runs[0][0][1].tolist() == [argmax[1, 0].item(), argmax[1, 1].item(), P, P]


def _random_case(seed, batch=16, max_gamma=4, vocab=12):
    """Random ragged inputs: zeros from top-k, some rows with draft == target, garbage padding."""
    generator = torch.Generator().manual_seed(seed)
    target_logits = torch.randn(batch, max_gamma + 1, vocab, generator=generator) * 2
    draft_logits = target_logits[:, :max_gamma] + torch.randn(batch, max_gamma, vocab, generator=generator)
    draft_logits[::5] = target_logits[::5, :max_gamma]  # residual is zero on a rejection: fallback
    top_k = torch.randint(0, vocab, (batch,), generator=generator)
    temperature = torch.ones(batch)
    draft_probs = logits_to_probs(draft_logits, temperature, top_k, torch.ones(batch))
    target_probs = logits_to_probs(target_logits, temperature, top_k, torch.ones(batch))
    draft_ids = sample(draft_probs.flatten(0, 1), generator).view(batch, max_gamma)
    num_draft = torch.randint(0, max_gamma + 1, (batch,), generator=generator)
    draft_ids[torch.arange(max_gamma) >= num_draft[:, None]] = 999  # out-of-vocab padding
    greedy = torch.rand(batch, generator=generator) < 0.3
    return draft_ids, num_draft, draft_probs, target_probs, greedy


def test_deterministic_when_seeded():
    draft_ids, num_draft, draft_probs, target_probs, _ = _random_case(0, batch=64)
    args = (draft_ids, num_draft, draft_probs, target_probs)
    first = rejection_sample(*args, torch.Generator().manual_seed(11))
    second = rejection_sample(*args, torch.Generator().manual_seed(11))
    other = rejection_sample(*args, torch.Generator().manual_seed(12))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_matches_loop_reference(seed):
    draft_ids, num_draft, draft_probs, target_probs, greedy = _random_case(seed)
    for greedy_rows in (greedy, None):
        args = (draft_ids, num_draft, draft_probs, target_probs)
        output, num_accepted = rejection_sample(*args, torch.Generator().manual_seed(seed), greedy_rows)
        expected, expected_accepted = rejection_sample_reference(
            *args, torch.Generator().manual_seed(seed), greedy_rows
        )
        assert torch.equal(output, expected)
        assert torch.equal(num_accepted, expected_accepted)
        emitted = torch.arange(draft_ids.shape[1] + 1) <= num_accepted[:, None]
        assert torch.equal(output != P, emitted)


def test_vectorised_matches_reference_without_draft_tokens():
    target_probs = torch.rand(5, 1, 7, generator=torch.Generator().manual_seed(0))
    args = (torch.zeros(5, 0, dtype=torch.int64), torch.zeros(5, dtype=torch.int64), torch.zeros(5, 0, 7), target_probs)
    output, num_accepted = rejection_sample(*args, torch.Generator().manual_seed(3))
    expected, _ = rejection_sample_reference(*args, torch.Generator().manual_seed(3))
    assert output.shape == (5, 1) and torch.equal(output, expected) and num_accepted.tolist() == [0] * 5


def test_identical_draft_and_target_accepts_everything():
    draft_ids, num_draft, _, target_probs, _ = _random_case(1, batch=256)
    draft_ids = sample(target_probs[:, :-1].flatten(0, 1), torch.Generator().manual_seed(2)).view(256, -1)
    output, num_accepted = rejection_sample(
        draft_ids, num_draft, target_probs[:, :-1], target_probs, torch.Generator().manual_seed(3)
    )
    assert torch.equal(num_accepted, num_draft)


def test_draft_token_with_zero_target_probability_is_always_rejected():
    batch, vocab = 1000, 6
    generator = torch.Generator().manual_seed(4)
    target_probs = torch.rand(batch, 3, vocab, generator=generator)
    target_probs[:, 0, 2] = 0.0
    draft_probs = torch.rand(batch, 2, vocab, generator=generator)
    draft_ids = torch.full((batch, 2), 2)
    output, num_accepted = rejection_sample(
        draft_ids, torch.full((batch,), 2), draft_probs, target_probs, generator
    )
    assert num_accepted.tolist() == [0] * batch
    assert not bool((output[:, 0] == 2).any())  # the recovered token is never the rejected one


# --- statistical losslessness ------------------------------------------------------------
# A toy bigram "language model": row 0 of a [1 + vocab, vocab] logits table is the first
# position, row 1 + t the position after token t. The draft is another such table.

NUM_TRIALS = 200_000
STAT_VOCAB = 8


def _tv_bound(num_cells, num_trials=NUM_TRIALS, delta=1e-6):
    """High-probability bound on the TV distance of an N-trial histogram to its true law.

    E[TV] = 0.5 * sum E|hat_i - p_i| <= 0.5 * sum sqrt(p_i / N) <= 0.5 * sqrt(K / N) (Jensen,
    Cauchy-Schwarz); one trial moves TV by <= 1 / N, so McDiarmid adds sqrt(ln(1/delta) / 2N).
    K = 8: 0.009; K = 64: 0.015.
    """
    return 0.5 * math.sqrt(num_cells / num_trials) + math.sqrt(math.log(1 / delta) / (2 * num_trials))


def _tables(scenario):
    """(target_logits, draft_logits [1 + vocab, vocab], temperature, top_k, top_p)."""
    generator = torch.Generator().manual_seed(2024)
    shape = (1 + STAT_VOCAB, STAT_VOCAB)

    def dirichlet():  # Dirichlet(1, ..., 1) rows, as logits
        return torch.empty(shape).exponential_(generator=generator).log()

    target = dirichlet()
    if scenario == "dirichlet":
        return target, dirichlet(), 1.0, 0, 1.0
    if scenario == "mismatched":  # the draft prefers exactly what the target dislikes
        return target, -3.0 * target, 1.0, 0, 1.0
    target = 2.0 * torch.randn(shape, generator=generator)
    return target, target + 1.5 * torch.randn(shape, generator=generator), 0.8, 5, 0.9


def _speculative_step(context, num_draft, tables, generator):
    """One draft-then-verify step for every trial, starting at table rows ``context`` [N]."""
    target_table, draft_table, temperature, top_k, top_p = tables
    params = (torch.full((len(context),), temperature), torch.full((len(context),), top_k),
              torch.full((len(context),), top_p))
    one = tuple(x[:1] for x in params)
    draft_probs_table = logits_to_probs(draft_table[None], *one)[0]
    rows, draft_ids = [context], []
    for _ in range(int(num_draft.max())):  # the drafter: sample from the processed draft table
        draft_ids.append(sample(draft_probs_table[rows[-1]], generator))
        rows.append(1 + draft_ids[-1])
    rows, draft_ids = torch.stack(rows, 1), torch.stack(draft_ids, 1)
    return speculative_sample(
        draft_ids, num_draft, draft_table[rows[:, :-1]], target_table[rows], *params, generator
    )


def _two_token_law(tables):
    """Law of the first two tokens ``[vocab, vocab]`` under a table (target or draft)."""
    logits, temperature, top_k, top_p = tables
    probs = logits_to_probs(logits[None], torch.tensor([temperature]), torch.tensor([top_k]),
                            torch.tensor([top_p]))[0].double()
    return probs[0][:, None] * probs[1:]


@pytest.mark.parametrize("scenario", ["dirichlet", "mismatched", "top_k_top_p"])
@pytest.mark.parametrize("gamma,ragged", [(1, False), (2, False), (4, True)])
def test_rejection_sampling_output_follows_target_distribution(scenario, gamma, ragged):
    tables = _tables(scenario)
    generator = torch.Generator().manual_seed(7)
    num_draft = torch.full((NUM_TRIALS,), gamma)
    if ragged:  # one big mixed batch: every gamma from 0 to 4
        num_draft = torch.arange(NUM_TRIALS) % (gamma + 1)
    start = torch.zeros(NUM_TRIALS, dtype=torch.int64)
    output, num_accepted = _speculative_step(start, num_draft, tables, generator)
    first = output[:, 0]
    # Rows that emitted a single token take the second one from a follow-up step.
    follow_up, _ = _speculative_step(1 + first, torch.full((NUM_TRIALS,), 2), tables, generator)
    second = torch.where(num_accepted >= 1, output[:, 1], follow_up[:, 0])

    counts = torch.bincount(first * STAT_VOCAB + second, minlength=STAT_VOCAB**2).double()
    joint = (counts / NUM_TRIALS).view(STAT_VOCAB, STAT_VOCAB)
    target_law = _two_token_law((tables[0],) + tables[2:])
    draft_law = _two_token_law(tables[1:])

    def tv(a, b):
        return 0.5 * (a - b).abs().sum().item()

    assert tv(target_law, draft_law) > 0.2  # the test would be vacuous otherwise
    assert tv(joint.sum(1), target_law.sum(1)) < _tv_bound(STAT_VOCAB)
    assert tv(joint, target_law) < _tv_bound(STAT_VOCAB**2)
    assert tv(joint, draft_law) > 10 * tv(joint, target_law)
