"""``ParallelConfig.worker_cls`` on vLLM's CPU platform: vLLM's CPU worker, whose model runner
drafts with the self-drafter (``selfspec``). Resolved by name in each vLLM worker process."""

from __future__ import annotations

from verl_efficientrollout.vllm_backend import compat
from verl_efficientrollout.vllm_backend.selfspec import SelfSpecRunnerMixin

_Worker, _Runner = compat.cpu_worker_classes()


class EfficientCPUModelRunner(SelfSpecRunnerMixin, _Runner):  # type: ignore[misc, valid-type]
    pass


class EfficientCPUWorker(_Worker):  # type: ignore[misc, valid-type]
    def init_device(self) -> None:
        super().init_device()
        # vLLM's CPU worker builds its runner inline (no factory to override): replace it before
        # anything used it (the model is loaded later, in load_model).
        self.model_runner = compat.make_self_spec_runner(self, EfficientCPUModelRunner)
