"""``rollout.name=efficient`` with ``engine: vllm``: verl's own vLLM rollout plus our three parts.

verl's classes serve (continuous batching on ``AsyncLLM``, TP/DP, CUDA-IPC or shared-memory weight
sync, sleep mode, abort/resume, the OpenAI endpoint); ours are subclasses through their hooks:

* ``EfficientVLLMHttpServer(vLLMHttpServer)``: our parts go in as vLLM engine arguments
  (``vllm_backend.engine.speculation_args``: the self-drafter's ``speculative_config`` and
  ``worker_cls``, our controller's ``scheduler_cls``, ``additional_config``) merged into what the
  user put under ``engine_kwargs.vllm``; what cannot combine is refused at start
  (``efficient_engine_kwargs``). ``generate`` fills verl's ``spec_num_*`` extra fields from vLLM's
  per-request spec-decode metrics.
* ``EfficientVLLMReplica(vLLMReplica)``: that server, named ``efficient_server_<replica>_<node>``
  (verl's ``ServerAdapter`` looks it up as ``f"{config.name}_"``).
* ``EfficientVLLMServerAdapter(ServerAdapter)``: verl's bucketed sync; returns the drafter rebuild's report.
* the worker extension (``vllm_backend.verl_worker``): verl's, with the drafter rebuilt in every sync.
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from verl_efficientrollout.config import EfficientRolloutConfig
from verl_efficientrollout.verl_adapter.compat import (
    vllm_http_server_class, vllm_replica_class, vllm_server_adapter_class)
from verl_efficientrollout.verl_adapter.config import FIELD, efficient_config

logger = logging.getLogger(__name__)

ENGINE_KWARGS = "actor_rollout_ref.rollout.engine_kwargs.vllm"
SERVER_PREFIX = "efficient_"
OURS = ("speculative_config", "worker_cls", "scheduler_cls", "worker_extension_cls")


def _get(config, key: str, default=None):
    value = getattr(config, key, default) if not isinstance(config, dict) else config.get(key, default)
    return default if value is None else value


def combination_errors(rollout_config, model_config, engine_kwargs: dict) -> list[str]:
    """What in verl's rollout / model config or the user's ``engine_kwargs.vllm`` cannot combine
    with the self-drafter, each naming the key and what to do (pure)."""
    errors = []
    for key in OURS:
        if engine_kwargs.get(key) is not None:
            errors.append(f"{ENGINE_KWARGS}.{key} is set ({engine_kwargs[key]!r}): rollout.name=efficient sets "
                          f"{key} itself; remove it, or use rollout.name=vllm for your own")
    extra = engine_kwargs.get("additional_config") or {}
    if isinstance(extra, dict) and "efficient" in extra:
        errors.append(f"{ENGINE_KWARGS}.additional_config.efficient is set: rollout.name=efficient fills it from "
                      f"{FIELD}; put those settings there")
    if engine_kwargs.get("async_scheduling"):
        errors.append(f"{ENGINE_KWARGS}.async_scheduling=True: the self-drafter needs synchronous scheduling; "
                      f"remove it")
    mtp = _get(rollout_config, "mtp")
    if mtp is not None and _get(mtp, "enable", False) and _get(mtp, "enable_rollout", False):
        errors.append("actor_rollout_ref.rollout.mtp.enable_rollout=True: verl's MTP speculation and the int4 "
                      "self-drafter are two drafters for one engine; set mtp.enable_rollout=false, or use "
                      "rollout.name=vllm for MTP")
    lora = _get(model_config, "lora", {}) or {}
    lora_rank = max(int(_get(model_config, "lora_rank", 0) or 0), int(_get(lora, "rank", 0) or 0))
    if lora_rank > 0 and not _get(lora, "merge", False):
        errors.append(f"actor_rollout_ref.model.lora_rank={lora_rank}: vLLM serves LoRA as an adapter the int4 "
                      f"drafter does not see; set actor_rollout_ref.model.lora.merge=true, or use rollout.name=vllm")
    pp = max(int(_get(rollout_config, "pipeline_model_parallel_size", 1)),
             int(engine_kwargs.get("pipeline_parallel_size") or 1))
    if pp > 1:
        errors.append(f"pipeline parallel size {pp} (actor_rollout_ref.rollout.pipeline_model_parallel_size or "
                      f"{ENGINE_KWARGS}.pipeline_parallel_size): the self-drafter needs every layer on each rank; "
                      f"use tensor parallelism (tensor_model_parallel_size) instead")
    quantization = _get(rollout_config, "quantization") or engine_kwargs.get("quantization")
    qat = _get(rollout_config, "qat", {}) or {}
    hf_quant = getattr(_get(model_config, "hf_config"), "quantization_config", None)
    if quantization or _get(qat, "enable", False) or hf_quant:
        which = (f"actor_rollout_ref.rollout.quantization={quantization!r}" if quantization else
                 "actor_rollout_ref.rollout.qat.enable=True" if _get(qat, "enable", False) else
                 "the checkpoint's quantization_config")
        errors.append(f"{which}: the drafter re-quantizes the target's bf16/fp32 linears and cannot read a quantized "
                      f"target; serve the unquantized checkpoint, or use rollout.name=vllm")
    return errors


def efficient_engine_kwargs(rollout_config, model_config, engine_kwargs: dict,
                            efficient: EfficientRolloutConfig, model_path: str) -> dict[str, Any]:
    """The engine arguments our parts add to verl's vLLM server (merged into ``engine_kwargs``), or
    ``ValueError`` listing every key that cannot combine. Toggle ``off``: nothing (plain verl vLLM).
    Where the self-drafter cannot serve this model on this vLLM (``compat.self_spec_unsupported``):
    nothing, with a warning naming why (plain decoding, never a crash at start)."""
    from verl_efficientrollout.vllm_backend.compat import self_spec_unsupported
    from verl_efficientrollout.vllm_backend.engine import speculation_args

    if efficient.controller.toggle == "off":
        return {}
    errors = combination_errors(rollout_config, model_config, engine_kwargs)
    if errors:
        raise ValueError("rollout.name=efficient (engine vllm) cannot start:\n  - " + "\n  - ".join(errors))
    if efficient.vllm.proposer != "self":
        raise ValueError(f"{FIELD}.vllm.proposer={efficient.vllm.proposer!r}: verl's weight sync does not reach "
                         f"vLLM's draft model; use proposer 'self' (the default) on verl's server")
    reason = self_spec_unsupported(model_path, {"pipeline_parallel_size": 1})
    if reason is not None:
        logger.warning("rollout.name=efficient serves %s without speculation (plain verl vLLM): %s", model_path, reason)
        return {}
    return speculation_args(model_path, efficient, "self",  # verl's server runs vLLM's "mp" executor unless told
                            executor=engine_kwargs.get("distributed_executor_backend") or "mp")


class _SpecMetricsEngine:
    """verl's ``AsyncLLM`` as it is, except that ``generate`` keeps each request's final
    ``spec_decode_metrics`` (vLLM's per-request per-step draft/accept counts) for the server, and
    ``pause_generation`` takes verl 0.9.1's arguments on vLLM >= 0.32 (``compat.pause_generation_kwargs``)."""

    def __init__(self, engine, sink: dict) -> None:
        self._engine, self._sink = engine, sink

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    async def pause_generation(self, **kwargs):
        from verl_efficientrollout.vllm_backend.compat import pause_generation_kwargs

        pause = self._engine.pause_generation
        return await pause(**pause_generation_kwargs(pause, kwargs))

    async def generate(self, *args, request_id: str, **kwargs):
        final = None
        async for output in self._engine.generate(*args, request_id=request_id, **kwargs):
            final = output
            yield output
        metrics = getattr(final.outputs[0], "spec_decode_metrics", None) if final is not None and final.outputs else None
        if metrics is not None:
            self._sink[request_id] = metrics


def spec_fields(metrics) -> dict[str, int]:
    """verl's per-request speculation fields from vLLM's per-step counts."""
    from verl_efficientrollout.vllm_backend.engine import verified_steps

    steps = verified_steps(metrics)
    return {"spec_num_draft_tokens": sum(d for _, d in steps), "spec_num_accepted_tokens": sum(a for a, _ in steps),
            "spec_num_verify_steps": len(steps)}


class EfficientVLLMHttpServer(vllm_http_server_class()):
    """verl's vLLM server with the self-drafter, our scheduler and per-request speculation metrics."""

    def _post_init(self, cuda_visible_devices: str) -> None:
        super()._post_init(cuda_visible_devices)
        self.efficient = efficient_config(self.config)  # a bad custom.efficient fails here, naming the field
        self._spec_metrics: dict[str, Any] = {}

    def _preprocess_engine_kwargs(self, engine_kwargs: dict) -> None:
        super()._preprocess_engine_kwargs(engine_kwargs)
        engine_kwargs.update(efficient_engine_kwargs(self.config, self.model_config, engine_kwargs, self.efficient,
                                                     self.model_config.local_path))
        self.speculative = "speculative_config" in engine_kwargs

    def _get_worker_extension_cls(self) -> str:
        from verl_efficientrollout.vllm_backend.verl_worker import QUALNAME

        return QUALNAME

    async def launch_server(self, *args, **kwargs):
        await super().launch_server(*args, **kwargs)
        if getattr(self, "engine", None) is not None:
            self.engine = _SpecMetricsEngine(self.engine, self._spec_metrics)

    async def generate(self, prompt_ids, sampling_params, request_id, *args, **kwargs):
        output = await super().generate(prompt_ids, sampling_params, request_id, *args, **kwargs)
        metrics = self._spec_metrics.pop(request_id, None)
        if metrics is not None:
            output.extra_fields.update(spec_fields(metrics))
        return output

    async def drafter_status(self) -> dict:
        """The first worker's drafter: recipe, bytes, version, whether it is off and why, its counts
        (``{"route": None}`` when this server does not speculate)."""
        if not self.speculative:
            return {"route": None}
        return (await self.engine.collective_rpc("efficient_drafter_status"))[0]

    async def last_sync(self) -> list[dict]:
        """Each worker's last weight sync: seconds and the drafter rebuild's report."""
        return await self.engine.collective_rpc("efficient_last_sync")


class EfficientVLLMReplica(vllm_replica_class()):
    """verl's vLLM replica serving ``EfficientVLLMHttpServer`` under the ``efficient_`` prefix."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.server_class = ray.remote(EfficientVLLMHttpServer)

    def _get_server_name_prefix(self) -> str:
        return SERVER_PREFIX


class EfficientVLLMServerAdapter(vllm_server_adapter_class()):
    """verl's worker-side adapter (bucketed sync over CUDA IPC, or shared memory where IPC is
    unsupported); ``update_weights`` returns the server's last-sync report (drafter rebuild included)."""

    async def update_weights(self, weights, global_steps: int | None = None, wire_format: str = "named_tensors",
                             **kwargs):
        if wire_format != "named_tensors":
            raise ValueError(f"rollout.name=efficient supports checkpoint wire_format 'named_tensors', got "
                             f"{wire_format!r}: the drafter is rebuilt from full tensors; set "
                             f"actor_rollout_ref.rollout.checkpoint_engine.backend to a full-tensor backend")
        await super().update_weights(weights, global_steps=global_steps, wire_format=wire_format, **kwargs)
        if not self._ensure_server_handle():
            return None
        reports = await self.server_handle.last_sync.remote()
        drafter = (reports[0] or {}).get("drafter") if reports else None
        if drafter and drafter.get("error"):
            logger.warning("efficient rollout: weights updated, drafter off until the next sync: %s", drafter["error"])
        else:
            logger.info("efficient rollout weights updated: %s", reports)
        return reports
