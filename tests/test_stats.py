"""The two-sample tests against textbook values, and their power on samples that do differ."""

import random

import pytest

from verl_efficientrollout.stats import (
    chi2_critical, chi2_goodness_of_fit, chi2_homogeneity, chi2_power, chi2_sf, kolmogorov_sf, ks_two_sample,
)


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


@pytest.mark.parametrize("dof, alpha, x", [(1, 0.05, 3.841459), (10, 0.01, 23.209251), (31, 1e-5, 71.0)])
def test_chi2_critical_value_inverts_the_survival_function(dof, alpha, x):
    critical = chi2_critical(dof, alpha)
    assert chi2_sf(critical, dof) == pytest.approx(alpha, rel=1e-6)
    if dof < 31:  # tabled values
        assert critical == pytest.approx(x, rel=1e-5)


@pytest.mark.parametrize("noncentrality, power", [(0.0, 0.05), (4.0, 0.5160), (7.849, 0.80)])
def test_chi2_power_matches_the_normal_formula_at_one_degree_of_freedom(noncentrality, power):
    """With one degree of freedom the power at level 5% is Phi(sqrt(l) - 1.96) + Phi(-sqrt(l) - 1.96):
    7.85 = (1.96 + 0.84)^2 is the textbook 80%."""
    assert chi2_power(1, noncentrality, 0.05) == pytest.approx(power, abs=1e-3)


def test_goodness_of_fit_passes_draws_of_the_law_fails_another_and_pools_rare_categories():
    """4000 draws; the other law is at total variation 0.05 (noncentrality 53): at level 1e-3 with 3
    degrees of freedom the test rejects it with probability > 0.999 (``chi2_power``), whatever the seed."""
    rng = random.Random(3)
    law = [0.5, 0.3, 0.15] + [0.05 / 50] * 50
    other = [0.45, 0.35, 0.15] + [0.05 / 50] * 50

    def counts(weights: list[float]) -> list[int]:
        draws = rng.choices(range(len(weights)), weights, k=4000)
        return [draws.count(i) for i in range(len(weights))]

    same = chi2_goodness_of_fit(counts(law), law)
    assert same.p_value > 1e-3 and same.dof == 3 and same.pooled_mass == pytest.approx(0.05)
    assert chi2_power(3, 4000 * (0.05 ** 2 / 0.5 + 0.05 ** 2 / 0.3), 1e-3) > 0.999
    assert chi2_goodness_of_fit(counts(other), law).p_value < 1e-3
    assert chi2_goodness_of_fit([10, 0, 1], [0.5, 0.5, 0.0]).p_value == 0.0  # drew a category of probability 0
    with pytest.raises(ValueError, match="one count per category"):
        chi2_goodness_of_fit([1, 2], [1.0])
