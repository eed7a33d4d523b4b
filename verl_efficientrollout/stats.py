"""Two-sample tests for "does speculation change what the policy samples?" (pure Python, no SciPy).

* :func:`ks_two_sample`: Kolmogorov-Smirnov on response lengths (asymptotic p-value);
* :func:`chi2_homogeneity`: chi-square test that two samples of tokens come from one law,
  categories with too few expected counts pooled into one.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass
from typing import Hashable, Sequence


@dataclass(frozen=True)
class TwoSampleResult:
    statistic: float
    p_value: float
    dof: int = 0  # chi-square only


def ks_two_sample(a: Sequence[float], b: Sequence[float]) -> TwoSampleResult:
    """Largest gap between the two empirical CDFs, with the asymptotic Kolmogorov p-value
    (conservative when the data have ties, e.g. lengths at a token cap)."""
    if not a or not b:
        raise ValueError("ks_two_sample needs two non-empty samples")
    xs, ys = sorted(a), sorted(b)
    gap = max(abs(bisect.bisect_right(xs, v) / len(xs) - bisect.bisect_right(ys, v) / len(ys)) for v in set(xs + ys))
    n = len(xs) * len(ys) / (len(xs) + len(ys))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * gap  # Stephens' small-sample correction
    return TwoSampleResult(gap, kolmogorov_sf(lam))


def kolmogorov_sf(lam: float) -> float:
    """P(K > lam) for the Kolmogorov distribution."""
    if lam < 0.2:
        return 1.0
    total = sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return min(1.0, max(0.0, 2 * total))


def chi2_homogeneity(a: Sequence[Hashable], b: Sequence[Hashable], min_expected: float = 5.0) -> TwoSampleResult:
    """Chi-square test of homogeneity of two categorical samples. Categories whose expected count
    is below ``min_expected`` in either sample are pooled into one 'other' category."""
    if not a or not b:
        raise ValueError("chi2_homogeneity needs two non-empty samples")
    count_a, count_b = Counter(a), Counter(b)
    n_a, n_b = len(a), len(b)
    share_a = n_a / (n_a + n_b)
    cells, other = [], [0, 0]
    for category in count_a.keys() | count_b.keys():
        total = count_a[category] + count_b[category]
        if min(total * share_a, total * (1 - share_a)) >= min_expected:
            cells.append((count_a[category], count_b[category]))
        else:
            other[0] += count_a[category]
            other[1] += count_b[category]
    if sum(other):
        cells.append(tuple(other))
    if len(cells) < 2:
        return TwoSampleResult(0.0, 1.0, 0)
    statistic = 0.0
    for observed_a, observed_b in cells:
        total = observed_a + observed_b
        for observed, expected in ((observed_a, total * share_a), (observed_b, total * (1 - share_a))):
            statistic += (observed - expected) ** 2 / expected
    dof = len(cells) - 1
    return TwoSampleResult(statistic, chi2_sf(statistic, dof), dof)


def chi2_sf(x: float, dof: int) -> float:
    """P(X > x) for a chi-square law with ``dof`` degrees of freedom: Q(dof/2, x/2)."""
    if x <= 0:
        return 1.0
    return _upper_regularized_gamma(dof / 2, x / 2)


def _upper_regularized_gamma(s: float, x: float) -> float:
    log_prefactor = s * math.log(x) - x - math.lgamma(s)
    if x < s + 1:  # series for the lower function
        term = total = 1.0 / s
        k = s
        while abs(term) > 1e-15 * abs(total):
            k += 1
            term *= x / k
            total += term
        return max(0.0, 1.0 - total * math.exp(log_prefactor))
    # Lentz's continued fraction for the upper function
    tiny = 1e-300
    b = x + 1 - s
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - s)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return min(1.0, math.exp(log_prefactor) * h)


def same_sampler_p_values(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]], samples: int,
                          positions: Sequence[int] = (1, 2, 3)) -> list[float]:
    """p-values of "both sets of responses come from one sampler": a KS test on response lengths,
    then a chi-square homogeneity test of the token at each of ``positions`` (pooled over prompts,
    keyed by prompt). Rows come as ``samples`` consecutive responses per prompt, prompts in the same
    order in both sets. Compare each with its share of the level (Bonferroni)."""
    p_values = [ks_two_sample([len(r) for r in reference], [len(r) for r in other]).p_value]
    for k in positions:
        def tokens(rows):
            return [(i // samples, r[k]) for i, r in enumerate(rows) if len(r) > k]

        p_values.append(chi2_homogeneity(tokens(reference), tokens(other)).p_value)
    return p_values


@dataclass(frozen=True)
class GoodnessOfFit:
    statistic: float
    p_value: float
    dof: int
    pooled_mass: float  # exact probability of the categories pooled into 'other'


def chi2_goodness_of_fit(counts: Sequence[int], law: Sequence[float], min_expected: float = 5.0) -> GoodnessOfFit:
    """Pearson's chi-square test that ``counts`` (one per category) were drawn from the exact ``law``.

    Categories whose expected count is below ``min_expected`` are pooled into one 'other' category;
    ``pooled_mass`` is their probability (a deviation of total variation ``eps`` from ``law`` leaves at
    least ``eps - pooled_mass`` on the categories tested)."""
    if len(counts) != len(law) or not counts:
        raise ValueError(f"chi2_goodness_of_fit needs one count per category: {len(counts)} counts, {len(law)} probs")
    n = sum(counts)
    if n <= 0:
        raise ValueError("chi2_goodness_of_fit needs a positive number of samples")
    total = sum(law)
    cells, other, pooled_mass = [], [0, 0.0], 0.0
    for count, prob in zip(counts, law):
        expected = n * prob / total
        if expected >= min_expected:
            cells.append((count, expected))
        else:
            other[0] += count
            other[1] += expected
            pooled_mass += prob / total
    if other[0] or other[1] > 0:
        if other[1] <= 0:  # a category of probability zero was drawn: no law with these counts
            return GoodnessOfFit(math.inf, 0.0, len(cells), pooled_mass)
        cells.append(tuple(other))
    if len(cells) < 2:
        return GoodnessOfFit(0.0, 1.0, 0, pooled_mass)
    statistic = sum((observed - expected) ** 2 / expected for observed, expected in cells)
    dof = len(cells) - 1
    return GoodnessOfFit(statistic, chi2_sf(statistic, dof), dof, pooled_mass)


def chi2_critical(dof: int, alpha: float) -> float:
    """The ``x`` with ``P(chi2_dof > x) = alpha`` (bisection on ``chi2_sf``)."""
    low, high = 0.0, dof + 100.0 * math.sqrt(2 * dof) + 200.0
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if chi2_sf(middle, dof) > alpha else (low, middle)
    return high


def chi2_power(dof: int, noncentrality: float, alpha: float) -> float:
    """Power of the chi-square test at level ``alpha`` when its statistic is noncentral chi-square with
    ``dof`` degrees of freedom and ``noncentrality`` (a Poisson mixture of central laws).

    For Pearson's test of ``n`` draws against ``law`` when they follow another law at total variation
    ``eps``, the noncentrality is ``n * sum((other - law)^2 / law) >= 4 * n * eps^2`` (Cauchy-Schwarz):
    ``chi2_power(dof, 4 * n * eps**2, alpha)`` is the power against the least detectable such law."""
    critical = chi2_critical(dof, alpha)
    half = noncentrality / 2
    power, j = 0.0, 0
    while True:
        weight = math.exp(-half + j * math.log(half) - math.lgamma(j + 1)) if half > 0 else float(j == 0)
        power += weight * chi2_sf(critical, dof + 2 * j)
        if j > half and weight < 1e-16:
            return min(1.0, power)
        j += 1
