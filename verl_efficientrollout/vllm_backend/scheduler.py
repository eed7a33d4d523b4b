"""``scheduler_cls``: our controller inside vLLM's scheduler (the engine-core process).

Before each step it asks the ``Controller`` (the same one the native engine runs) whether to
speculate and with which gamma, for the running batch and its context, and writes that K into
vLLM's dynamic-speculation lookup (K = 0: no drafts); from each verified request it feeds back the
drafted and accepted tokens (``make_spec_decoding_stats``). The controller config travels in
``additional_config["efficient"]["controller"]``. vLLM applies the K of a step to the drafts
proposed at its end, so decisions act one step later than in the native engine; the drafter's
own KV cache still costs a drafter forward per step at K = 0 (vLLM's draft_model design).
"""

from __future__ import annotations

from verl_efficientrollout.controller import Controller, ControllerConfig, EngineState, StepObservation, per_position_counts
from verl_efficientrollout.vllm_backend.compat import scheduler_base

_Base = scheduler_base()


class EfficientScheduler(_Base):  # type: ignore[misc, valid-type]
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        extra = (self.vllm_config.additional_config or {}).get("efficient") or {}
        self.controller = Controller(ControllerConfig.from_dict(extra.get("controller") or {}))
        self._k_max = self.num_spec_tokens
        if self.dynamic_sd_lookup is None:  # a lookup also switches off vLLM's uniform-K padding
            self.dynamic_sd_lookup = [self._k_max] * (self.max_num_running_reqs + 1)
        self._decision = None
        self._state: EngineState | None = None
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
        if self._decision is not None and self._verified:
            drafted, accepted = per_position_counts([a for a, _ in self._verified], [d for _, d in self._verified])
            self.controller.observe(StepObservation(self._decision, self._state.batch_size,
                                                    self._state.total_context, drafted, accepted))
        self._verified = []
        running = list(self.running)
        if not running:
            self._step = 0  # idle: the next requests start a new rollout
        else:
            if self._step == 0:
                self.controller.begin_rollout()
            self._state = EngineState(len(running), sum(r.num_computed_tokens for r in running), self._step,
                                      len(running))
            self._decision = self.controller.decide(self._state)
            gamma = min(self._decision.gamma, self._k_max) if self._decision.speculate else 0
            lookup = self.dynamic_sd_lookup
            lookup[1:] = [gamma] * (len(lookup) - 1)
            self._step += 1
        return super().schedule(*args, **kwargs)
