"""Which vLLM engine steps our scheduler can time, and the K schedule of a calibration (pure Python).

vLLM's step n verifies the drafts proposed at the end of step n - 1 (with that step's K), then
runs the drafter over this step's tokens (always: the drafter's own KV cache must follow, so
K = 0 still costs a drafter forward) and K - 1 more drafter forwards. The time between two
``schedule`` calls is one whole step, and it is a clean measurement of "a plain step" (K = 0)
or "a speculative step of K drafts" only when K did not change from the step before, no prompt
was waiting or being prefilled, and the same rollout was still running at the next call (no
idle gap inside the interval).
"""

from __future__ import annotations

from dataclasses import dataclass

from verl_efficientrollout.controller import Decision, EngineState


@dataclass(frozen=True)
class ScheduledStep:
    """What was known when one step was scheduled."""

    decision: Decision
    state: EngineState
    decode_only: bool  # no prompt waiting or part-prefilled
    request_ids: frozenset
    started: float  # perf_counter at schedule()


class StepTimer:
    """Remembers the last two scheduled steps; ``finished`` names the step that just ran and
    its time when that time is clean (else None)."""

    def __init__(self) -> None:
        self._history: list[ScheduledStep] = []

    def scheduled(self, step: ScheduledStep) -> None:
        self._history = (self._history + [step])[-2:]

    def finished(self, now: float, running_ids: frozenset) -> tuple[ScheduledStep | None, float | None]:
        if not self._history:
            return None, None
        last = self._history[-1]
        steady = len(self._history) == 2 and self._history[0].decision.gamma == last.decision.gamma
        clean = steady and last.decode_only and bool(running_ids & last.request_ids)
        return last, (now - last.started) if clean else None

    def reset(self) -> None:
        self._history = []


class CalibrationSchedule:
    """K for each step of a calibration: ``gammas`` in turn, each held for ``hold_steps`` clean
    decode steps after one transition step (whose verify still has the previous K), then the
    cycle again. Only decode steps advance it.

    Example: gammas (0, 2), hold_steps 2 -> K = 0, 0, 0, 2, 2, 2, 0, ... over decode steps.
    """

    def __init__(self, gammas, hold_steps: int) -> None:
        self.gammas, self.hold_steps = tuple(int(g) for g in gammas), int(hold_steps)
        self._decode_steps = 0

    def gamma(self, decode_only: bool) -> int:
        phase = (self._decode_steps // (self.hold_steps + 1)) % len(self.gammas)
        self._decode_steps += decode_only
        return self.gammas[phase]

    def reset(self) -> None:
        self._decode_steps = 0
