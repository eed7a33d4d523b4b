"""Replay a rollout through a Controller against "true" step costs, deterministically.

Everything is in expectation: a speculative step advances every active row by
E[accepted + 1] tokens (fractional progress is fine) and feeds the controller the expected
per-position counts, so a run is exact and repeatable. Use it to compare policies, to check
a cost profile's consequences, and in tests.

Example: one row, response 10, acceptance 1.0, gamma 4, target 1 s, draft 0.5 s, verify
1.2 s: two steps of 5 tokens, 2 * (4 * 0.5 + 1.2) = 6.4 s, against 10 s of plain decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from verl_efficientrollout._validate import check_float, check_int, fail

from .config import ControllerConfig
from .controller import Controller, StepObservation
from .cost_model import CostModel, expected_output_tokens
from .policies import EngineState


@dataclass(frozen=True)
class Trace:
    """One rollout: per-row prompt and response lengths, all rows admitted at the start, and
    the true conditional acceptance per draft position (the last value repeats)."""

    prompt_lengths: tuple[int, ...]
    response_lengths: tuple[int, ...]
    acceptance: tuple[float, ...] = (0.9,)

    def __post_init__(self) -> None:
        if not self.prompt_lengths:
            fail("Trace", "prompt_lengths", "a non-empty tuple of integers >= 0", self.prompt_lengths)
        if len(self.response_lengths) != len(self.prompt_lengths):
            n = len(self.prompt_lengths)
            fail("Trace", "response_lengths", f"a tuple of {n} lengths, one per prompt", self.response_lengths)
        for n in self.prompt_lengths:
            check_int("Trace", "prompt_lengths", n, low=0)
        for n in self.response_lengths:
            check_int("Trace", "response_lengths", n, low=1)
        if not self.acceptance:
            fail("Trace", "acceptance", "a non-empty tuple of probabilities", self.acceptance)
        for a in self.acceptance:
            check_float("Trace", "acceptance", a, low=0.0, high=1.0)


@dataclass(frozen=True)
class SimResult:
    total_seconds: float
    steps: int
    speculated_steps: int
    tokens: float
    gamma_histogram: dict[int, int]
    per_step: list[tuple[int, bool, int, float]] = field(repr=False)  # (batch, speculate, gamma, seconds)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.total_seconds


def simulate(trace: Trace, controller: Controller, true_costs: CostModel) -> SimResult:
    """Run ``trace`` to completion (``controller.begin_rollout()`` first) and time it."""
    n = len(trace.prompt_lengths)
    progress = [0.0] * n
    per_step: list[tuple[int, bool, int, float]] = []
    histogram: dict[int, int] = {}
    total = tokens = 0.0
    controller.begin_rollout()
    while True:
        active = [i for i in range(n) if progress[i] < trace.response_lengths[i]]
        if not active:
            break
        batch = len(active)
        context = int(sum(trace.prompt_lengths[i] + progress[i] for i in active))
        decision = controller.decide(EngineState(batch, context, len(per_step), n))
        gamma = decision.gamma
        if decision.speculate:
            gain = expected_output_tokens(trace.acceptance, gamma)
            draft_s = gamma * true_costs.draft_time(batch, context)
            verify_s = true_costs.verify_time(batch, context, gamma)
            seconds = draft_s + verify_s
            drafted, accepted, reach = [], [], float(batch)
            for i in range(gamma):
                a = trace.acceptance[min(i, len(trace.acceptance) - 1)]
                drafted.append(reach)
                accepted.append(reach * a)
                reach *= a
            obs = StepObservation(decision, batch, context, tuple(drafted), tuple(accepted),
                                  draft_seconds=draft_s, verify_seconds=verify_s)
        else:
            gain = 1.0
            seconds = true_costs.target_time(batch, context)
            obs = StepObservation(decision, batch, context, target_seconds=seconds)
        controller.observe(obs)
        for i in active:
            step_tokens = min(gain, trace.response_lengths[i] - progress[i])
            progress[i] += step_tokens
            tokens += step_tokens
        total += seconds
        histogram[gamma] = histogram.get(gamma, 0) + 1
        per_step.append((batch, decision.speculate, gamma, seconds))
    speculated = sum(1 for _, on, _, _ in per_step if on)
    return SimResult(total, len(per_step), speculated, tokens, histogram, per_step)


def simulate_ar(trace: Trace, cost_model: CostModel) -> SimResult:
    """The plain-decoding baseline: ``simulate`` with the toggle off."""
    return simulate(trace, Controller(ControllerConfig(toggle="off", draft_length="fixed"), cost_model), cost_model)
