"""``ParallelConfig.worker_cls`` on vLLM's CUDA platform: vLLM's GPU worker, whose model runner
drafts with the self-drafter (``selfspec``). Written for vLLM >= 0.24, < 0.34; not run on a GPU yet."""

from __future__ import annotations

from verl_efficientrollout.vllm_backend import compat
from verl_efficientrollout.vllm_backend.selfspec import SelfSpecRunnerMixin

_Worker, _Runner = compat.gpu_worker_classes()


class EfficientGPUModelRunner(SelfSpecRunnerMixin, _Runner):  # type: ignore[misc, valid-type]
    pass


class EfficientGPUWorker(_Worker):  # type: ignore[misc, valid-type]
    def _make_model_runner(self):
        """vLLM >= 0.32 builds the runner here ("subclasses override this")."""
        return compat.make_self_spec_runner(self, EfficientGPUModelRunner)

    def init_device(self) -> None:
        super().init_device()
        if not isinstance(self.model_runner, EfficientGPUModelRunner):  # vLLM 0.24: built inline in init_device
            self.model_runner = compat.make_self_spec_runner(self, EfficientGPUModelRunner)
