"""The two classes veRL looks up by ``rollout.name=efficient``; they dispatch on
``custom.efficient.engine``: ``vllm`` is verl's own vLLM rollout with our parts
(``vllm_rollout``: an instance of its subclass is returned), ``native`` and ``sglang`` are served
by ``EfficientServer``:

* ``EfficientServerAdapter`` (worker side, ``BaseRollout``): lives in the trainer worker; after
  each training step it streams the new weights to its replica's server in buckets, then commits
  them (target swapped, int4 drafter rebuilt) before the next rollout.
* ``EfficientReplica`` (driver side, ``RolloutReplica``): starts one ``EfficientServer`` Ray actor
  per replica, next to the replica's workers (same node, same accelerator), and exposes it to
  veRL's agent loop as the token-in/token-out server handle.
"""

from __future__ import annotations

import logging
import os
from typing import Generator

import ray
import torch
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica

from verl_efficientrollout.verl_adapter.config import server_settings
from verl_efficientrollout.verl_adapter.server import EfficientServer

logger = logging.getLogger(__name__)

BUCKET_BYTES_DEFAULT = 512 << 20


def server_actor_name(replica_rank: int, node_rank: int = 0) -> str:
    return f"efficient_server_{replica_rank}_{node_rank}"


def _model_path(model_config) -> str:
    return getattr(model_config, "local_path", None) or model_config.path


def _engine(rollout_config) -> str:
    from verl_efficientrollout.verl_adapter.config import efficient_config

    return efficient_config(rollout_config).engine


class EfficientServerAdapter(BaseRollout):
    """Worker-side client of the replica's server: weights in, sleep/wake through."""

    def __new__(cls, config, model_config=None, device_mesh=None, *args, **kwargs):
        if _engine(config) == "vllm":  # verl's ServerAdapter with ours: an instance of that class
            from verl_efficientrollout.verl_adapter.vllm_rollout import EfficientVLLMServerAdapter

            return EfficientVLLMServerAdapter(config, model_config, device_mesh, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1, **kwargs) -> None:
        super().__init__(config, model_config, device_mesh)
        server_settings(self.config, _model_path(self.model_config))  # bad config fails here, in the worker
        rank = int(os.environ.get("RANK", 0))
        world = (self.config.tensor_model_parallel_size * self.config.data_parallel_size
                 * self.config.pipeline_model_parallel_size)
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % world
        self._has_server = self.rollout_rank == 0  # one server per replica, fed by its first rank
        self._server = None

    def _server_handle(self):
        if self._server is None and self._has_server:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]) -> None:
        server = self._server_handle()
        if server is not None and self.config.free_cache_engine:
            await server.wake_up.remote(tags=tags)

    async def release(self) -> None:
        server = self._server_handle()
        if server is not None and self.config.free_cache_engine:
            await server.sleep.remote()

    @torch.no_grad()
    async def update_weights(
        self,
        weights: Generator[tuple[str, torch.Tensor], None, None],
        global_steps: int | None = None,
        wire_format: str = "named_tensors",
        **kwargs,
    ) -> dict | None:
        """Send every (HF name, tensor) to the server in buckets, then commit: the server
        validates the whole set, swaps the target, rebuilds the drafter. A partial or mismatched
        set raises here and the server keeps serving the previous weights."""
        if wire_format != "named_tensors":
            raise ValueError(f"rollout.name=efficient supports checkpoint wire_format 'named_tensors', got "
                             f"{wire_format!r}: set actor_rollout_ref.rollout.checkpoint_engine.backend to a full-"
                             "tensor backend (naive, nccl, nixl)")
        server = self._server_handle()
        if server is None:
            for _ in weights:  # other ranks of the replica: drain the generator, as the stream requires
                pass
            return None
        mb = getattr(getattr(self.config, "checkpoint_engine", None), "update_weights_bucket_megabytes", None)
        limit = (mb << 20) if mb else BUCKET_BYTES_DEFAULT
        await server.begin_weights.remote()  # an earlier update that failed half-way leaves nothing behind
        bucket, size = [], 0
        for name, tensor in weights:
            tensor = tensor.detach().to("cpu", copy=True)  # the sender may reuse its buffers
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= limit:
                await server.receive_weights.remote(bucket)
                bucket, size = [], 0
        if bucket:
            await server.receive_weights.remote(bucket)
        report = await server.commit_weights.remote(global_steps)
        logger.info("efficient rollout weights updated: %s", report)
        return report


class EfficientReplica(RolloutReplica):
    """One ``EfficientServer`` actor per replica (``engine: vllm``: verl's vLLM replica, ``vllm_rollout``)."""

    def __new__(cls, *args, **kwargs):
        config = kwargs["config"] if "config" in kwargs else args[1]
        if _engine(config) == "vllm":
            from verl_efficientrollout.verl_adapter.vllm_rollout import EfficientVLLMReplica

            return EfficientVLLMReplica(*args, **kwargs)
        return super().__new__(cls)

    def rollout_worker_use_gpu(self) -> bool:
        return torch.cuda.is_available()

    async def init_standalone(self) -> None:
        """Standalone without accelerators (verl's own standalone path asks Ray for GPUs): the
        server is the only process this replica needs."""
        if torch.cuda.is_available():
            return await super().init_standalone()
        self.rollout_mode = RolloutMode.STANDALONE
        await self.launch_servers()

    async def launch_servers(self) -> None:
        settings = server_settings(self.config, _model_path(self.model_config))
        options = {"name": server_actor_name(self.replica_rank), "max_concurrency": self.max_concurrency}
        if self.workers:  # beside the replica's first worker: same node, same accelerator
            node_id, accelerators = await self.workers[0].__ray_call__.remote(
                lambda worker: (ray.get_runtime_context().get_node_id(),
                                ray.get_runtime_context().get_accelerator_ids().get("GPU", [])))
            options["scheduling_strategy"] = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=False)
            if accelerators:
                options["runtime_env"] = {"env_vars": {"CUDA_VISIBLE_DEVICES": str(accelerators[0]),
                                                       "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
        server = ray.remote(EfficientServer).options(**options).remote(settings, self.replica_rank)
        drafter = await server.launch.remote()
        logger.info("efficient rollout server %s up (drafter %s)", options["name"], drafter)
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"efficient://{options['name']}"

    async def get_metrics(self, reset: bool = True) -> list[dict]:
        return await self._server_handle.get_metrics.remote(reset)
