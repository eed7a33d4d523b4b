"""``scheduler_cls``: our controller inside vLLM's scheduler (the engine-core process).

Before each decode step it asks the ``Controller`` (the same one the native engine runs) whether
to speculate and with which gamma, for the running batch and its context, and writes that K into
vLLM's dynamic-speculation lookup (K = 0: no drafts; while requests wait or prefill, K = 0 without
asking, as the native engine decides only once its batch is prefilled); from each verified
request it feeds back the drafted and accepted tokens (``make_spec_decoding_stats``), and from the time between two
``schedule`` calls the measured step time, which corrects the cost profile online (which step
times are clean: ``steps.StepTimer``). The controller config travels in
``additional_config["efficient"]["controller"]``; ``controller.profile: auto`` is the bundled
vLLM profile. vLLM applies the K of a step to the drafts proposed at its end, so decisions act
one step later than in the native engine. With the self-drafter (``vllm.proposer: self``) a K = 0
step is plain vLLM's step; on the draft_model route the drafter's own KV cache costs a drafter
forward per step even at K = 0, which that route's profile (``structure: draft-model``) includes.

Calibration (``additional_config["efficient"]["calibration"]``, ``efficient-rollout calibrate
--engine vllm``): no controller; K follows ``steps.CalibrationSchedule`` and every clean step's
time is appended to a JSON-lines file.

Diagnosis: with ``VERL_EFFICIENTROLLOUT_DECISION_LOG=<path>`` every decision (batch, context, K,
predicted speedup, reason) and the measured time of the step it scheduled are appended to
``<path>`` as JSON lines.
"""

from __future__ import annotations

import json
import os
import time

from verl_efficientrollout.controller import (
    Controller, ControllerConfig, CostModel, Decision, EngineState, StepObservation, load_profile, per_position_counts,
)
from verl_efficientrollout.vllm_backend.compat import scheduler_base
from verl_efficientrollout.vllm_backend.steps import CalibrationSchedule, ScheduledStep, StepTimer

DECISION_LOG_ENV = "VERL_EFFICIENTROLLOUT_DECISION_LOG"

_Base = scheduler_base()


class EfficientScheduler(_Base):  # type: ignore[misc, valid-type]
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        extra = (self.vllm_config.additional_config or {}).get("efficient") or {}
        calibration = extra.get("calibration")
        self.calibration = CalibrationSchedule(calibration["gammas"], calibration["hold_steps"]) if calibration else None
        self._step_log = calibration["log"] if calibration else None
        self._decision_log = os.environ.get(DECISION_LOG_ENV) or None
        config = ControllerConfig.from_dict(extra.get("controller") or {})
        self.controller = None if calibration else Controller(
            config, CostModel(load_profile(config.profile, engine="vllm"), config.refine_rate))
        self._k_max = self.num_spec_tokens
        if self.dynamic_sd_lookup is None:  # a lookup also switches off vLLM's uniform-K padding
            self.dynamic_sd_lookup = [self._k_max] * (self.max_num_running_reqs + 1)
        self._timer = StepTimer()
        self._verified: list[tuple[int, int]] = []  # (accepted, drafted) per request, this step
        self._step = 0

    def make_spec_decoding_stats(self, spec_decoding_stats, num_draft_tokens, num_accepted_tokens,
                                 num_invalid_spec_tokens, request_id):
        if num_draft_tokens:
            invalid = (num_invalid_spec_tokens or {}).get(request_id, 0)
            self._verified.append((num_accepted_tokens, num_draft_tokens - invalid))
        return super().make_spec_decoding_stats(spec_decoding_stats, num_draft_tokens, num_accepted_tokens,
                                                num_invalid_spec_tokens, request_id)

    def schedule(self, *args, **kwargs):
        now = time.perf_counter()
        running = list(self.running)
        ids = frozenset(r.request_id for r in running)
        self._observe(*self._timer.finished(now, ids))
        if not running:
            self._step = 0  # idle: the next requests start a new rollout
            self.dynamic_sd_lookup[1:] = [0] * (len(self.dynamic_sd_lookup) - 1)  # their prefill: K = 0
            self._timer.reset()
            if self.calibration is not None:
                self.calibration.reset()
        else:
            if self._step == 0 and self.controller is not None:
                self.controller.begin_rollout()
            decode_only = not self.waiting and all(r.num_computed_tokens >= r.num_prompt_tokens for r in running)
            state = EngineState(len(running), sum(r.num_computed_tokens for r in running), self._step, len(running))
            if self.calibration is not None:
                gamma = min(self.calibration.gamma(decode_only), self._k_max)
                decision = Decision(gamma > 0, gamma, 0.0, "calibration")
            elif not decode_only:
                # The batch is still filling (vLLM's engine core takes requests as they arrive, so a
                # rollout's first steps see a few of its rows): no decision yet, or the toggle would
                # switch on for one row and hold that through its dwell at the full batch.
                decision = Decision(False, 0, 1.0, "batch still filling")
            else:
                decision = self.controller.decide(state)
            gamma = min(decision.gamma, self._k_max) if decision.speculate else 0
            lookup = self.dynamic_sd_lookup
            lookup[1:] = [gamma] * (len(lookup) - 1)
            self._timer.scheduled(ScheduledStep(decision, state, decode_only, ids, now))
            self._step += 1
        return super().schedule(*args, **kwargs)

    def _observe(self, step: ScheduledStep | None, seconds: float | None) -> None:
        """Feed the step that just ran to the controller (or the calibration log): the acceptance
        of the drafts it verified, and its time when that is clean."""
        verified, self._verified = self._verified, []
        if step is None:
            return
        spec = step.decision.speculate
        if self._decision_log is not None:
            d = step.decision
            with open(self._decision_log, "a") as f:
                f.write(json.dumps({"step": self._step, "batch": step.state.batch_size, "gamma": d.gamma,
                                    "context": step.state.total_context, "decode_only": step.decode_only,
                                    "predicted_speedup": d.predicted_speedup, "reason": d.reason,
                                    "seconds": seconds, "verified": len(verified)}) + "\n")
        if self._step_log is not None:
            if seconds is not None:
                record = {"kind": "step" if spec else "target", "batch": step.state.batch_size,
                          "total_context": step.state.total_context, "gamma": step.decision.gamma, "seconds": seconds}
                with open(self._step_log, "a") as f:
                    f.write(json.dumps(record) + "\n")
            return
        drafted, accepted = per_position_counts([a for a, _ in verified], [d for _, d in verified]) \
            if verified else ((), ())
        self.controller.observe(StepObservation(
            step.decision, step.state.batch_size, step.state.total_context, tuple(drafted), tuple(accepted),
            target_seconds=None if spec else seconds, step_seconds=seconds if spec else None))
