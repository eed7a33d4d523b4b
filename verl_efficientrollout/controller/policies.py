"""The two small policy families the controller composes every decode step.

1. A draft-length policy names the gamma this step would use: ``FixedGamma``,
   ``AdaptiveGamma`` (best predicted speedup, every step) or ``GammaLadder`` (the paper's rungs).
2. A toggle policy decides whether to speculate at that gamma and returns the ``Decision``:
   ``Off``, ``Always``, ``Threshold``, ``Roofline`` (ours) or ``PaperToggle``.

Every policy has the same methods, so the controller calls them without ``if enabled``
branches; policies that keep no per-rollout state make ``begin_rollout`` a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from verl_efficientrollout._validate import check_int

from .acceptance import AcceptanceEstimator
from .config import ControllerConfig
from .cost_model import CostModel, predicted_speedup


@dataclass(frozen=True)
class EngineState:
    """What the engine knows before a decode step.

    total_context: sum of the context lengths (prompt + generated) of the active rows.
    num_requests_seen: requests admitted so far in the current rollout.
    """

    batch_size: int
    total_context: int
    step: int = 0
    num_requests_seen: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "total_context", "step", "num_requests_seen"):
            check_int("EngineState", name, getattr(self, name), low=0)


@dataclass(frozen=True)
class Decision:
    """What to do this step: speculate with ``gamma`` draft tokens, or one plain step (gamma 0)."""

    speculate: bool
    gamma: int
    predicted_speedup: float
    reason: str

    def __post_init__(self) -> None:
        if self.speculate != (self.gamma > 0):
            raise ValueError(f"Decision.gamma must be >= 1 when speculating and 0 otherwise, got {self.gamma}")


class Predictor:
    """Predicted per-step speedup of speculating with gamma, from the cost model and acceptance."""

    def __init__(self, cost_model: CostModel, estimator: AcceptanceEstimator) -> None:
        self.cost_model = cost_model
        self.estimator = estimator

    def speedup(self, state: EngineState, gamma: int, rates: Sequence[float] | None = None) -> float:
        """``rates`` defaults to the live estimate; the paper toggle passes frozen ones."""
        r, v = self.cost_model.ratios(state.batch_size, state.total_context, gamma)
        return predicted_speedup(self.estimator.rates() if rates is None else rates, gamma, r, v)


# ---------------------------------------------------------------- draft length


class DraftLengthPolicy(Protocol):
    def gamma(self, state: EngineState, predictor: Predictor) -> int: ...

    def begin_rollout(self, previous: AcceptanceEstimator) -> None: ...


class FixedGamma:
    def __init__(self, gamma: int) -> None:
        self._gamma = gamma

    def gamma(self, state: EngineState, predictor: Predictor) -> int:
        return self._gamma

    def begin_rollout(self, previous: AcceptanceEstimator) -> None:
        pass


class AdaptiveGamma:
    """The gamma in [gamma_min, gamma_max] with the highest predicted speedup (smallest on ties).

    Example: acceptance 0.9 everywhere, r = 0.5, v = 1.0 -> speedups 1.267, 1.355, 1.376,
    1.365 for gamma 1..4, so gamma 3.
    """

    def __init__(self, gamma_min: int, gamma_max: int) -> None:
        self.gammas = range(gamma_min, gamma_max + 1)

    def gamma(self, state: EngineState, predictor: Predictor) -> int:
        return max(self.gammas, key=lambda g: (predictor.speedup(state, g), -g))

    def begin_rollout(self, previous: AcceptanceEstimator) -> None:
        pass


class GammaLadder:
    """The paper's ladder: one rung up after ``patience`` consecutive rollouts with token
    acceptance >= ``up``, one rung down after as many with <= ``down``; clamped to the ends.
    Rollouts in which nothing was drafted neither extend nor break a streak."""

    def __init__(self, rungs: Sequence[int], up: float, down: float, patience: int) -> None:
        self.rungs, self.up, self.down, self.patience = tuple(rungs), up, down, patience
        self.rung = 0
        self._good = self._bad = 0

    def gamma(self, state: EngineState, predictor: Predictor) -> int:
        return self.rungs[self.rung]

    def begin_rollout(self, previous: AcceptanceEstimator) -> None:
        if not previous.has_data:
            return
        acceptance = previous.token_acceptance()
        self._good = self._good + 1 if acceptance >= self.up else 0
        self._bad = self._bad + 1 if acceptance <= self.down else 0
        if self._good >= self.patience:
            self.rung, self._good = min(self.rung + 1, len(self.rungs) - 1), 0
        elif self._bad >= self.patience:
            self.rung, self._bad = max(self.rung - 1, 0), 0


# ---------------------------------------------------------------- toggles


class TogglePolicy(Protocol):
    def decide(self, state: EngineState, gamma: int, speedup: float) -> Decision: ...

    def begin_rollout(self, previous: AcceptanceEstimator) -> None: ...


def _decision(on: bool, gamma: int, speedup: float, reason: str) -> Decision:
    return Decision(on, gamma if on else 0, speedup, reason)


class Off:
    def decide(self, state: EngineState, gamma: int, speedup: float) -> Decision:
        return _decision(False, gamma, speedup, "off")

    def begin_rollout(self, previous: AcceptanceEstimator) -> None:
        pass


class Always:
    def decide(self, state: EngineState, gamma: int, speedup: float) -> Decision:
        return _decision(True, gamma, speedup, "always")

    def begin_rollout(self, previous: AcceptanceEstimator) -> None:
        pass


class Threshold:
    """Speculate iff the active batch is at most ``batch_limit`` rows."""

    def __init__(self, batch_limit: int) -> None:
        self.batch_limit = batch_limit

    def decide(self, state: EngineState, gamma: int, speedup: float) -> Decision:
        on = state.batch_size <= self.batch_limit
        return _decision(on, gamma, speedup, f"batch {state.batch_size} {'<=' if on else '>'} {self.batch_limit}")

    def begin_rollout(self, previous: AcceptanceEstimator) -> None:
        pass


class Roofline:
    """Goodput toggle with hysteresis: switches on when the predicted speedup is >= ``margin``,
    off when it is < ``off_margin``, keeps its state in between, and after any switch holds
    for ``min_dwell_steps`` decisions. Each rollout starts off and may switch on at its first
    step: the state at the end of the last rollout (a few rows left) says nothing of the new one's
    first steps (a full batch), and holding it on there cost a 64-row rollout on vLLM 5 speculative
    steps at full batch (measured)."""

    def __init__(self, margin: float, off_margin: float, min_dwell_steps: int) -> None:
        self.margin, self.off_margin, self.min_dwell_steps = margin, off_margin, min_dwell_steps
        self.on = False
        self._dwell_left = 0

    def decide(self, state: EngineState, gamma: int, speedup: float) -> Decision:
        want = speedup >= (self.off_margin if self.on else self.margin)
        if want != self.on and self._dwell_left == 0:
            self.on, self._dwell_left = want, self.min_dwell_steps
            reason = f"switched {'on' if want else 'off'}: predicted {speedup:.3f}"
        else:
            reason = f"{'held' if want != self.on else 'stays'} {'on' if self.on else 'off'}: predicted {speedup:.3f}"
            self._dwell_left = max(self._dwell_left - 1, 0)
        return _decision(self.on, gamma, speedup, reason)

    def begin_rollout(self, previous: AcceptanceEstimator) -> None:
        self.on, self._dwell_left = False, 0


class PaperToggle:
    """The paper's toggle, monotone within a rollout.

    Off at ``begin_rollout``; no decision while ``num_requests_seen <= min_requests`` (the
    paper waits for MORE than 32 requests); then on, for the rest of the rollout, at the first
    step whose predicted speedup >= ``margin``. The prediction uses the acceptance rates of the
    previous rollout, frozen (the prior before the first), and the current cost ratios.
    """

    def __init__(self, predictor: Predictor, margin: float, min_requests: int) -> None:
        self.predictor, self.margin, self.min_requests = predictor, margin, min_requests
        self.on = False
        self.frozen_rates: tuple[float, ...] = predictor.estimator.rates()

    def decide(self, state: EngineState, gamma: int, speedup: float) -> Decision:
        if self.on:
            return _decision(True, gamma, speedup, "on until the next rollout")
        if state.num_requests_seen <= self.min_requests:
            reason = f"waiting: {state.num_requests_seen} <= {self.min_requests} requests"
            return _decision(False, gamma, speedup, reason)
        frozen = self.predictor.speedup(state, gamma, self.frozen_rates)
        self.on = frozen >= self.margin
        return _decision(self.on, gamma, frozen, f"{'switched on' if self.on else 'off'}: predicted {frozen:.3f}")

    def begin_rollout(self, previous: AcceptanceEstimator) -> None:
        self.on = False
        self.frozen_rates = previous.rates()


def build_policies(config: ControllerConfig, predictor: Predictor) -> tuple[TogglePolicy, DraftLengthPolicy]:
    """The (toggle, draft length) pair that ``config`` names."""
    toggles = {
        "off": lambda: Off(),
        "always": lambda: Always(),
        "threshold": lambda: Threshold(config.threshold_batch_size),
        "roofline": lambda: Roofline(config.margin, config.off_margin, config.min_dwell_steps),
        "paper": lambda: PaperToggle(predictor, config.margin, config.paper_min_requests),
    }
    lengths = {
        "fixed": lambda: FixedGamma(config.gamma),
        "adaptive": lambda: AdaptiveGamma(config.gamma_min, config.gamma_max),
        "ladder": lambda: GammaLadder(
            config.paper_ladder, config.ladder_up, config.ladder_down, config.ladder_patience
        ),
    }
    return toggles[config.toggle](), lengths[config.draft_length]()
