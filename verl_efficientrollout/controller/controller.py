"""The per-decode-step speculation controller (pure Python; the engine calls it every step).

Engine loop::

    controller = Controller.from_config(ControllerConfig.preset("efficient"))
    controller.begin_rollout()
    while rows_active:
        decision = controller.decide(EngineState(batch_size, total_context, step, num_requests_seen))
        if decision.speculate:
            ... draft decision.gamma tokens, verify, accept ...
            drafted, accepted = per_position_counts(num_accepted_per_row, decision.gamma)
            obs = StepObservation(decision, batch_size, total_context, drafted, accepted,
                                  draft_seconds=t_draft, verify_seconds=t_verify)
        else:
            ... one plain decoding step ...
            obs = StepObservation(decision, batch_size, total_context, target_seconds=t_step)
        controller.observe(obs)

Each ``decide`` asks the draft-length policy for this step's gamma, predicts the speedup of
speculating with it (cost model ratios + live acceptance), and lets the toggle policy decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .acceptance import AcceptanceEstimator
from .config import ControllerConfig
from .cost_model import CostModel, load_profile
from .policies import Decision, EngineState, Predictor, build_policies


@dataclass(frozen=True)
class StepObservation:
    """What happened in one step, for ``Controller.observe``.

    drafted_per_position / accepted_per_position: see the contract in ``acceptance.py``
        (empty for a plain step).
    target_seconds: the plain decoding step's time (when not speculating).
    draft_seconds: the time of ALL gamma draft forwards of the step; verify_seconds: the verify
        forward's. step_seconds: a speculative step timed only as a whole (draft and verify in
        one engine step, as in vLLM). Leave a time None when it was not measured.
    """

    decision: Decision
    batch_size: int
    total_context: int
    drafted_per_position: tuple[float, ...] = ()
    accepted_per_position: tuple[float, ...] = ()
    target_seconds: float | None = None
    draft_seconds: float | None = None
    verify_seconds: float | None = None
    step_seconds: float | None = None


@dataclass
class ControllerStats:
    """Running counters over observed steps (gamma 0 in the histogram counts plain steps).

    ``drafted_tokens`` counts draft tokens the target reached (the contract in acceptance.py);
    ``draft_rows`` counts row-steps that drafted, so mean acceptance length (with the bonus
    or recovered token) = (accepted_tokens + draft_rows) / draft_rows.
    """

    steps: int = 0
    speculated_steps: int = 0
    draft_rows: float = 0.0
    drafted_tokens: float = 0.0
    accepted_tokens: float = 0.0
    switches: int = 0
    gamma_histogram: dict[int, int] = field(default_factory=dict)

    @property
    def token_acceptance(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return (self.accepted_tokens + self.draft_rows) / self.draft_rows if self.draft_rows else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "speculated_steps": self.speculated_steps,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "token_acceptance": self.token_acceptance,
            "mean_acceptance_length": self.mean_acceptance_length,
            "switches": self.switches,
            "gamma_histogram": dict(sorted(self.gamma_histogram.items())),
        }


class Controller:
    """Decides each decode step whether to speculate and with which gamma; learns from
    ``observe``. ``cost_model`` defaults to ``config.profile`` refined at ``config.refine_rate``."""

    def __init__(self, config: ControllerConfig | None = None, cost_model: CostModel | None = None) -> None:
        self.config = config = config or ControllerConfig()
        self.cost_model = cost_model or CostModel(load_profile(config.profile), config.refine_rate)
        self.estimator = self._new_estimator(config.acceptance_decay)
        self.rollout_acceptance = self._new_estimator(1.0)  # the current rollout only, undecayed
        self.predictor = Predictor(self.cost_model, self.estimator)
        self.toggle, self.draft_length = build_policies(config, self.predictor)
        self.stats = ControllerStats()
        self._last_speculate = False

    @classmethod
    def from_config(cls, config: ControllerConfig | Mapping[str, Any]) -> "Controller":
        """From a ``ControllerConfig`` or a plain mapping of its fields."""
        return cls(config if isinstance(config, ControllerConfig) else ControllerConfig.from_dict(config))

    def _new_estimator(self, decay: float) -> AcceptanceEstimator:
        c = self.config
        return AcceptanceEstimator(c.longest_draft, decay, c.prior_acceptance, c.prior_weight)

    def begin_rollout(self) -> None:
        """Call when a new rollout starts (after the weight sync): per-rollout policies reset,
        and the ladder moves using the acceptance measured in the rollout that just ended."""
        previous, self.rollout_acceptance = self.rollout_acceptance, self._new_estimator(1.0)
        self.draft_length.begin_rollout(previous)
        self.toggle.begin_rollout(previous)

    def decide(self, state: EngineState) -> Decision:
        gamma = self.draft_length.gamma(state, self.predictor)
        return self.toggle.decide(state, gamma, self.predictor.speedup(state, gamma))

    def observe(self, obs: StepObservation) -> None:
        """Learn from one executed step: acceptance counts, measured times, stats."""
        decision, s = obs.decision, self.stats
        b, ctx = obs.batch_size, obs.total_context
        if decision.speculate:
            self.estimator.observe(obs.drafted_per_position, obs.accepted_per_position)
            self.rollout_acceptance.observe(obs.drafted_per_position, obs.accepted_per_position)
            if obs.draft_seconds is not None:
                self.cost_model.observe("draft", b, ctx, obs.draft_seconds / decision.gamma)
            if obs.verify_seconds is not None:
                self.cost_model.observe("verify", b, ctx, obs.verify_seconds, gamma=decision.gamma)
            if obs.step_seconds is not None:
                self.cost_model.observe_step(b, ctx, decision.gamma, obs.step_seconds)
            s.speculated_steps += 1
            s.draft_rows += obs.drafted_per_position[0] if obs.drafted_per_position else 0
            s.drafted_tokens += sum(obs.drafted_per_position)
            s.accepted_tokens += sum(obs.accepted_per_position)
        elif obs.target_seconds is not None:
            self.cost_model.observe("target", b, ctx, obs.target_seconds)
        s.steps += 1
        s.switches += decision.speculate != self._last_speculate
        self._last_speculate = decision.speculate
        s.gamma_histogram[decision.gamma] = s.gamma_histogram.get(decision.gamma, 0) + 1
