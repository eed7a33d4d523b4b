"""Live estimate of the drafter's per-position acceptance.

THE CONTRACT FOR ENGINES (what ``observe`` expects after each speculative step)
------------------------------------------------------------------------------
Counts per draft position i = 0, 1, ..., summed over the rows of the step:

- ``drafted_per_position[i]``: rows that REACHED position i: the row drafted a token at
  position i AND all its earlier draft tokens (0..i-1) were accepted, so the target really
  judged token i;
- ``accepted_per_position[i]``: of those, the rows whose position-i token was accepted.

Then ``accepted[i] / drafted[i]`` is directly the conditional acceptance a_i = P(token i
accepted | tokens 0..i-1 accepted), the quantity ``expected_output_tokens`` needs. Tokens
after a row's first rejection are not counted anywhere. Example, gamma = 4, two rows:
row A accepts 2 tokens (its 3rd is rejected), row B accepts all 4::

    row A: drafted [1, 1, 1, 0]  accepted [1, 1, 0, 0]
    row B: drafted [1, 1, 1, 1]  accepted [1, 1, 1, 1]
    step : drafted (2, 2, 2, 1)  accepted (2, 2, 1, 1)

``per_position_counts(num_accepted=[2, 4], gamma=4)`` builds exactly these tuples from the
number of accepted draft tokens per row. Floats are allowed (the simulator feeds expectations).
"""

from __future__ import annotations

from typing import Sequence

from verl_efficientrollout._validate import check_float, check_int

from .cost_model import expected_output_tokens


def per_position_counts(
    num_accepted: Sequence[int], gamma: int | Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(drafted_per_position, accepted_per_position) from accepted draft tokens per row.

    ``gamma`` is the draft length of every row, or one per row for ragged drafts.

    >>> per_position_counts([2, 4], 4)
    ((2, 2, 2, 1), (2, 2, 1, 1))
    """
    gammas = [gamma] * len(num_accepted) if isinstance(gamma, int) else list(gamma)
    width = max(gammas, default=0)
    drafted, accepted = [0] * width, [0] * width
    for n, g in zip(num_accepted, gammas, strict=True):
        if not 0 <= n <= g:
            raise ValueError(f"a row accepted {n} draft tokens out of gamma={g}")
        for i in range(min(n + 1, g)):
            drafted[i] += 1
        for i in range(n):
            accepted[i] += 1
    return tuple(drafted), tuple(accepted)


class AcceptanceEstimator:
    """Exponentially decayed per-position counts of reached and accepted draft tokens.

    Every ``observe`` first multiplies all counts by ``decay`` (0.98 keeps about the last 50
    speculative steps), then adds the new counts. Estimates are shrunk toward a prior so that
    few observations cannot swing them, in two levels:

    - pooled (all positions): (accepted + w * prior) / (drafted + w), w = ``prior_weight``;
    - position i: (accepted_i + w * pooled) / (drafted_i + w).

    So a position never reached yet (say 6 while gamma has been 4) inherits the pooled rate
    instead of the fixed prior, which keeps the adaptive gamma free to grow. With no data at
    all every rate is ``prior``. Example (w = 4, prior = 0.8, decay 1): observing drafted
    (10, 8), accepted (8, 6) gives pooled (14 + 3.2) / (18 + 4) = 0.782 and
    a_0 = (8 + 4 * 0.782) / 14 = 0.795.
    """

    def __init__(self, max_positions: int, decay: float = 0.98, prior: float = 0.8, prior_weight: float = 4.0) -> None:
        check_int("AcceptanceEstimator", "max_positions", max_positions, low=1)
        check_float("AcceptanceEstimator", "decay", decay, low=0.0, high=1.0, low_open=True)
        check_float("AcceptanceEstimator", "prior", prior, low=0.0, high=1.0)
        check_float("AcceptanceEstimator", "prior_weight", prior_weight, low=0.0)
        self.max_positions = max_positions
        self.decay = decay
        self.prior = prior
        self.prior_weight = prior_weight
        self.drafted = [0.0] * max_positions
        self.accepted = [0.0] * max_positions

    def observe(self, drafted_per_position: Sequence[float], accepted_per_position: Sequence[float]) -> None:
        """Add one speculative step's counts (see the module docstring for the contract)."""
        if len(drafted_per_position) != len(accepted_per_position) or len(drafted_per_position) > self.max_positions:
            raise ValueError(
                f"drafted_per_position and accepted_per_position must have the same length <= "
                f"{self.max_positions}, got {len(drafted_per_position)} and {len(accepted_per_position)}"
            )
        for i in range(self.max_positions):
            self.drafted[i] *= self.decay
            self.accepted[i] *= self.decay
        for i, (d, a) in enumerate(zip(drafted_per_position, accepted_per_position)):
            if not 0 <= a <= d:
                raise ValueError(f"position {i}: accepted ({a}) must be in [0, drafted ({d})]")
            self.drafted[i] += d
            self.accepted[i] += a

    def token_acceptance(self) -> float:
        """The pooled per-token (conditional) acceptance over all positions, prior-shrunk."""
        return _shrunk(sum(self.accepted), sum(self.drafted), self.prior, self.prior_weight)

    def rates(self) -> tuple[float, ...]:
        """Conditional acceptance a_i per position i, prior-shrunk (see the class docstring)."""
        pooled = self.token_acceptance()
        return tuple(_shrunk(a, d, pooled, self.prior_weight) for a, d in zip(self.accepted, self.drafted))

    def mean_acceptance_length(self, gamma: int) -> float:
        """Expected tokens per row per step (accepted + the bonus or recovered one) at gamma."""
        return expected_output_tokens(self.rates(), gamma)

    @property
    def has_data(self) -> bool:
        return sum(self.drafted) > 0.0


def _shrunk(accepted: float, drafted: float, prior: float, weight: float) -> float:
    total = drafted + weight
    return (accepted + weight * prior) / total if total > 0.0 else prior
