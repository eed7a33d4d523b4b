import random

import pytest

from verl_efficientrollout.controller import AcceptanceEstimator, per_position_counts


def draw_step(rng, rows, gamma, acceptance):
    """Accepted draft tokens per row when each token is accepted with ``acceptance``."""
    accepted = []
    for _ in range(rows):
        n = 0
        while n < gamma and rng.random() < acceptance:
            n += 1
        accepted.append(n)
    return accepted


def expected_counts(rows, gamma, acceptance):
    drafted, accepted, reach = [], [], float(rows)
    for _ in range(gamma):
        drafted.append(reach)
        accepted.append(reach * acceptance)
        reach *= acceptance
    return drafted, accepted


def test_per_position_counts_follow_the_reached_contract():
    assert per_position_counts([2, 4], 4) == ((2, 2, 2, 1), (2, 2, 1, 1))
    assert per_position_counts([0, 1], [1, 3]) == ((2, 1, 0), (1, 0, 0))  # ragged gammas
    with pytest.raises(ValueError, match="accepted 5 draft tokens out of gamma=4"):
        per_position_counts([5], 4)


def test_no_data_gives_the_prior_everywhere():
    est = AcceptanceEstimator(4, prior=0.7)
    assert est.rates() == (0.7,) * 4
    assert est.token_acceptance() == 0.7
    assert est.mean_acceptance_length(2) == pytest.approx(1 + 0.7 + 0.49)
    assert not est.has_data


def test_shrinkage_matches_the_docstring_example():
    est = AcceptanceEstimator(2, decay=1.0, prior=0.8, prior_weight=4.0)
    est.observe((10, 8), (8, 6))
    pooled = (14 + 3.2) / 22
    assert est.token_acceptance() == pytest.approx(pooled)
    assert est.rates()[0] == pytest.approx((8 + 4 * pooled) / 14)


def test_estimator_converges_to_the_true_acceptance():
    rng = random.Random(0)
    est = AcceptanceEstimator(4, decay=0.999)
    for _ in range(3000):
        est.observe(*per_position_counts(draw_step(rng, 8, 4, 0.9), 4))
    assert all(abs(a - 0.9) < 0.02 for a in est.rates()), est.rates()
    assert est.token_acceptance() == pytest.approx(0.9, abs=0.01)
    assert est.mean_acceptance_length(4) == pytest.approx(1 + 0.9 + 0.81 + 0.729 + 0.6561, abs=0.1)


def test_unreached_positions_inherit_the_pooled_rate_not_the_prior():
    est = AcceptanceEstimator(8, decay=1.0, prior=0.5)
    for _ in range(100):
        est.observe(*expected_counts(4, 2, 0.95))
    assert est.rates()[7] == pytest.approx(0.95, abs=0.01)


def test_decay_forgets_an_old_regime():
    est = AcceptanceEstimator(4, decay=0.98)
    for _ in range(500):
        est.observe(*expected_counts(8, 4, 0.9))
    for _ in range(300):
        est.observe(*expected_counts(8, 4, 0.5))
    assert all(abs(a - 0.5) < 0.01 for a in est.rates()), est.rates()
    slow = AcceptanceEstimator(4, decay=1.0)
    for a, n in ((0.9, 500), (0.5, 300)):
        for _ in range(n):
            slow.observe(*expected_counts(8, 4, a))
    assert slow.rates()[0] > 0.7  # without decay the old regime still dominates


def test_observe_rejects_broken_counts():
    est = AcceptanceEstimator(2)
    with pytest.raises(ValueError, match="same length"):
        est.observe((1, 1, 1), (1, 1, 1))
    with pytest.raises(ValueError, match=r"position 1: accepted \(2\)"):
        est.observe((2, 1), (1, 2))
