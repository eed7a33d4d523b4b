"""The two-sample tests against textbook values, and their power on samples that do differ."""

import random

import pytest

from verl_efficientrollout.stats import chi2_homogeneity, chi2_sf, kolmogorov_sf, ks_two_sample


@pytest.mark.parametrize("x, dof, p", [(3.841459, 1, 0.05), (18.307038, 10, 0.05), (6.634897, 1, 0.01),
                                       (0.5, 3, 0.918891), (124.342, 100, 0.05), (2.0, 2, 0.367879)])
def test_chi2_survival_matches_tables(x, dof, p):
    assert chi2_sf(x, dof) == pytest.approx(p, rel=1e-4)


@pytest.mark.parametrize("lam, p", [(1.3581, 0.05), (1.6276, 0.01), (0.8276, 0.5), (0.1, 1.0)])
def test_kolmogorov_survival_matches_tables(lam, p):
    assert kolmogorov_sf(lam) == pytest.approx(p, abs=2e-4)


def test_samples_of_one_law_pass_and_shifted_samples_fail():
    rng = random.Random(0)
    same_a = [rng.expovariate(1 / 100) for _ in range(400)]
    same_b = [rng.expovariate(1 / 100) for _ in range(400)]
    shorter = [rng.expovariate(1 / 70) for _ in range(400)]
    assert ks_two_sample(same_a, same_b).p_value > 0.05
    assert ks_two_sample(same_a, shorter).p_value < 0.01


def test_token_frequencies_of_one_law_pass_and_of_another_fail():
    rng = random.Random(1)
    law = [0.4, 0.2, 0.1] + [0.3 / 30] * 30  # a few frequent tokens and a long tail (pooled)
    other = [0.25, 0.35, 0.1] + [0.3 / 30] * 30
    draw = lambda weights: rng.choices(range(len(weights)), weights, k=600)  # noqa: E731
    same = chi2_homogeneity(draw(law), draw(law))
    assert same.p_value > 0.05 and same.dof >= 3
    assert chi2_homogeneity(draw(law), draw(other)).p_value < 0.01


def test_empty_samples_are_refused():
    with pytest.raises(ValueError, match="non-empty"):
        ks_two_sample([], [1])


def test_one_sampler_passes_and_a_sampler_biased_at_one_position_fails():
    """Rows of 4 prompts x 50 samples: the same sampler twice, then one whose second token
    prefers another value for every prompt."""
    from verl_efficientrollout.stats import same_sampler_p_values

    rng = random.Random(1)

    def rows(biased: bool) -> list[list[int]]:
        out = []
        for prompt in range(4):
            for _ in range(50):
                second = rng.choice([7, 7, 8] if biased else [7, 8, 8])
                out.append([prompt, second, rng.randrange(3)] + [9] * rng.randrange(5, 15))
        return out

    assert min(same_sampler_p_values(rows(False), rows(False), samples=50)) > 0.01
    p_values = same_sampler_p_values(rows(False), rows(True), samples=50)
    assert p_values[1] < 1e-6 and p_values[0] > 0.01  # position 1 differs; the lengths do not
