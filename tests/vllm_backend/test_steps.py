"""Which vLLM step times our scheduler uses, and a calibration's K schedule (pure Python)."""

from verl_efficientrollout.controller import Decision, EngineState
from verl_efficientrollout.vllm_backend.steps import CalibrationSchedule, ScheduledStep, StepTimer

ROLLOUT = frozenset({"a", "b"})


def step(gamma, started, decode_only=True, ids=ROLLOUT):
    return ScheduledStep(Decision(gamma > 0, gamma, 1.0, "test"), EngineState(len(ids), 100), decode_only, ids,
                         started)


def test_a_decode_step_with_the_same_k_as_the_step_before_is_timed():
    timer = StepTimer()
    timer.scheduled(step(2, 10.0))
    timer.scheduled(step(2, 10.5))
    last, seconds = timer.finished(11.25, frozenset({"a"}))  # "b" finished in that step: still the same rollout
    assert last.decision.gamma == 2 and seconds == 0.75


def test_a_k_change_a_prefill_or_an_idle_gap_leaves_the_step_untimed():
    changed = StepTimer()
    changed.scheduled(step(0, 10.0))
    changed.scheduled(step(2, 10.5))  # its verify still has the previous step's K (none)
    assert changed.finished(11.0, ROLLOUT) == (changed._history[-1], None)
    prefill = StepTimer()
    prefill.scheduled(step(2, 10.0))
    prefill.scheduled(step(2, 10.5, decode_only=False))
    assert prefill.finished(11.0, ROLLOUT)[1] is None
    idle = StepTimer()
    idle.scheduled(step(0, 10.0))
    idle.scheduled(step(0, 10.5))
    assert idle.finished(99.0, frozenset({"c"}))[1] is None  # the rollout ended; a new one started later
    assert StepTimer().finished(1.0, ROLLOUT) == (None, None)


def test_calibration_holds_each_gamma_for_its_clean_steps_after_one_transition_step():
    schedule = CalibrationSchedule((0, 2), hold_steps=2)
    assert [schedule.gamma(True) for _ in range(7)] == [0, 0, 0, 2, 2, 2, 0]
    schedule.reset()
    assert [schedule.gamma(False) for _ in range(3)] == [0, 0, 0]  # prefill steps do not advance it
