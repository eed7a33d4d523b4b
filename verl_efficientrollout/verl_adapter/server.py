"""The rollout server veRL's agent loop talks to: token ids in, ``TokenOutput`` out.

veRL sends one ``generate`` call per sample, concurrently. The server gathers the calls that
arrive together (``batch_window_s``) into one engine batch, so a GRPO step of P prompts x n
samples decodes as one rollout batch with a shrinking active set, which is where the
controller decides step by step whether to speculate. Engine work runs in a worker thread, so
abort, metrics and weight calls stay responsive while a batch decodes.

Weights arrive in buckets (``receive_weights``) and take effect at ``commit_weights``: the
engine validates the complete set, swaps the target and rebuilds the int4 drafter before the
next batch; a partial or mismatched set is rejected and the previous weights keep serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any

from verl_efficientrollout.config import SamplingParams
from verl_efficientrollout.engine.base import Request, RequestOutput, RolloutResult
from verl_efficientrollout.verl_adapter.config import ServerSettings

logger = logging.getLogger(__name__)

# The keys of veRL's sampling_params dict this server understands.
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_tokens", "max_new_tokens", "logprobs",
                 "repetition_penalty", "ignore_eos", "seed")


def load_engine(settings: ServerSettings):
    """The engine ``settings.efficient.engine`` names, serving ``settings.model_path``: the native
    engine or an ``sglang.Engine`` (``sglang_backend``) with the int4 self-drafter. ``engine: vllm``
    is verl's own vLLM server (``vllm_rollout``), never this one: ``ValueError``."""
    efficient = settings.efficient
    if efficient.engine == "vllm":
        raise ValueError("custom.efficient.engine: 'vllm' is served by verl's own vLLM server "
                         "(verl_adapter.vllm_rollout.EfficientVLLMReplica, which EfficientReplica dispatches to), "
                         "not by EfficientServer; EfficientServer loads 'native' or 'sglang' (an in-process "
                         "VLLMEngine can still be passed as engine=)")
    if efficient.engine == "sglang":
        from verl_efficientrollout.sglang_backend.engine import SGLangEngine

        return SGLangEngine(settings.model_path, efficient, seed=settings.seed)
    from verl_efficientrollout.engine.native import NativeEngine

    return NativeEngine.load(settings.model_path, efficient)


class EfficientServer:
    """One engine behind veRL's generate API. Ray makes it an actor (``ray.remote(EfficientServer)``);
    tests drive it in-process."""

    def __init__(self, settings: ServerSettings, replica_rank: int = 0, engine=None) -> None:
        """``engine``: an already loaded engine to serve (in-process use); else ``launch`` loads one."""
        self.settings = settings
        self.replica_rank = replica_rank
        self.engine = engine
        self.global_steps: int | None = None
        self._queue: list[tuple[Request, asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None
        self._engine_lock: asyncio.Lock | None = None
        self._abort = threading.Event()  # polled by the engine between decode steps
        self._admission: asyncio.Event | None = None  # cleared while aborted: new requests wait
        self._reject = False
        self._pending_weights: dict[str, Any] = {}
        self._batches = 0
        self._metrics: list[dict[str, Any]] = []
        self._rebuild_seconds: float | None = None

    # ------------------------------------------------------------------ life cycle

    async def launch(self) -> str:
        """Load the model and build the drafter (call once, before the first generate); returns the
        drafter's recipe ("none" when the engine decodes plain)."""
        self._async_state()
        if self.engine is None:
            self.engine = await asyncio.to_thread(load_engine, self.settings)
        return self.engine.drafter_recipe or "none"

    def _async_state(self) -> None:
        if self._wake is None:  # created on the serving event loop
            self._wake, self._engine_lock, self._admission = asyncio.Event(), asyncio.Lock(), asyncio.Event()
            self._admission.set()

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """Weights stay resident; the KV cache is re-allocated on the next batch."""

    async def sleep(self) -> None:
        await self.clear_kv_cache()

    async def clear_kv_cache(self) -> None:
        async with self._engine_lock:
            self.engine.release_kv_cache()

    release_kv_cache = clear_kv_cache

    async def resume_kv_cache(self) -> None:
        """The cache comes back with the next batch."""

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    async def start_profile(self, **kwargs) -> None:
        logger.info("profiling is not implemented by the efficient server; ignoring start_profile")

    async def stop_profile(self) -> None:
        pass

    # ------------------------------------------------------------------ abort / resume

    async def abort_all_requests(self, reject_request: bool = False, **kwargs) -> dict[str, Any]:
        """Finish every running and queued request now with the tokens it has (``aborted``); new
        requests wait for ``resume_generation`` (or are answered ``aborted`` with
        ``reject_request``)."""
        self._abort.set()
        self._admission.clear()
        self._reject = reject_request
        queued, self._queue = self._queue, []
        for request, future in queued:
            if not future.done():
                future.set_result(RequestOutput(request.request_id, [], "abort"))
        async with self._engine_lock:  # the running batch has noticed and returned
            pass
        return {"aborted_queued": len(queued)}

    async def resume_generation(self) -> None:
        self._abort.clear()
        self._reject = False
        self._admission.set()

    async def wait_for_requests_to_drain(self) -> None:
        while self._queue or self._engine_lock.locked():
            await asyncio.sleep(0.01)

    # ------------------------------------------------------------------ weights

    async def begin_weights(self) -> None:
        """Start a new update: drop whatever an earlier, interrupted update left buffered."""
        if self._pending_weights:
            logger.warning("discarding %d buffered tensors of an interrupted weight update", len(self._pending_weights))
        self._pending_weights = {}

    async def receive_weights(self, bucket: list[tuple[str, Any]]) -> int:
        """Buffer one bucket of (HF name, tensor); nothing serves them before ``commit_weights``."""
        for name, tensor in bucket:
            self._pending_weights[name] = tensor
        return len(self._pending_weights)

    async def commit_weights(self, global_steps: int | None = None) -> dict[str, Any]:
        """Load the buffered weights into the target and rebuild the drafter, between batches.
        Raises ``ValueError`` (and keeps the previous weights) if the set is partial or mismatched."""
        pending, self._pending_weights = self._pending_weights, {}
        async with self._engine_lock:
            start = time.perf_counter()
            await asyncio.to_thread(self.engine.update_weights, pending.items())
            self.engine.release_kv_cache()
            seconds = time.perf_counter() - start
        self._rebuild_seconds = self.engine.drafter_build_seconds
        if global_steps is not None:
            self.global_steps = global_steps
        return {"weights_version": self.engine.weights_version, "update_seconds": seconds,
                "drafter_build_seconds": self._rebuild_seconds}

    # ------------------------------------------------------------------ generation

    def to_request(self, prompt_ids: list[int], sampling_params: dict[str, Any], request_id: str) -> Request:
        """veRL's (vLLM-style) sampling params -> our ``Request``; unsupported values are errors."""
        params = dict(sampling_params)
        unknown = sorted(set(params) - set(SAMPLING_KEYS))
        if unknown:
            raise ValueError(f"sampling_params keys {unknown} are not supported by rollout.name=efficient; "
                             f"supported: {', '.join(SAMPLING_KEYS)}")
        if params.get("repetition_penalty", 1.0) != 1.0:
            raise ValueError(f"sampling_params.repetition_penalty must be 1.0, got {params['repetition_penalty']!r}")
        if params.get("ignore_eos", False):
            raise ValueError("sampling_params.ignore_eos must be False for rollout.name=efficient")
        top_k = params.get("top_k", -1)
        top_k = 0 if top_k is None or top_k < 0 else int(top_k)  # vLLM's -1 = off is our 0
        sampling = SamplingParams(float(params.get("temperature", 1.0)), top_k, float(params.get("top_p", 1.0)))
        prompt_ids = [int(t) for t in prompt_ids]
        room = self.settings.max_model_len - len(prompt_ids)
        if room < 1:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room to generate within "
                             f"max_model_len {self.settings.max_model_len}")
        max_tokens = params.get("max_tokens", params.get("max_new_tokens"))
        if max_tokens is None:  # as verl's vLLM server: the response budget, within the context
            s = self.settings
            max_tokens = min(s.response_length, s.prompt_length + s.response_length - len(prompt_ids))
        logprobs = params.get("logprobs")
        return Request(tuple(prompt_ids), max(1, min(int(max_tokens), room)), sampling, str(request_id),
                       logprobs=logprobs is not None and logprobs is not False)

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Any = None,
        video_data: Any = None,
        audio_data: Any = None,
        mm_processor_kwargs: Any = None,
        priority: int = 0,
        **kwargs: Any,
    ):
        """veRL's token-in/token-out call; returns verl's ``TokenOutput``."""
        from verl.workers.rollout.replica import TokenOutput

        if image_data is not None or video_data is not None or audio_data is not None:
            raise ValueError("rollout.name=efficient serves text-only models: image/video/audio data is not supported")
        request = self.to_request(prompt_ids, sampling_params, request_id)
        error = self.engine.check_request(request)
        if error:
            raise ValueError(f"request {request_id!r}: {error}")
        output = await self.submit(request)
        stop_reason = {"abort": "aborted", "error": None}.get(output.finish_reason, "completed")
        if output.finish_reason == "error":
            raise RuntimeError(f"request {request_id!r} failed: {output.error}")
        return TokenOutput(
            token_ids=output.token_ids, log_probs=output.log_probs, stop_reason=stop_reason,
            extra_fields={
                # verl's own per-request speculative-decoding metrics (rollout/spec_accept_rate, ..._length)
                "spec_num_draft_tokens": output.num_draft_tokens,
                "spec_num_accepted_tokens": output.num_accepted_tokens,
                "spec_num_verify_steps": output.num_verify_steps,
                "global_steps": self.global_steps,
            },
        )

    async def submit(self, request: Request) -> RequestOutput:
        """Queue ``request`` for the next batch and wait for its output."""
        self._async_state()
        if not self._admission.is_set():
            if self._reject:
                return RequestOutput(request.request_id, [], "abort")
            await self._admission.wait()
        future = asyncio.get_running_loop().create_future()
        self._queue.append((request, future))
        self._wake.set()
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.create_task(self._batch_loop())
        return await future

    async def _batch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue and len(self._queue) < self.settings.max_num_seqs:
                seen = len(self._queue)  # keep gathering while requests keep arriving
                await asyncio.sleep(self.settings.batch_window_s)
                if len(self._queue) == seen:
                    break
            batch = self._queue[: self.settings.max_num_seqs]
            del self._queue[: len(batch)]
            if not batch:
                continue
            async with self._engine_lock:
                seed = self.settings.seed + 1_000_003 * self.replica_rank + self._batches
                self._batches += 1
                try:
                    result: RolloutResult = await asyncio.to_thread(
                        self.engine.generate, [r for r, _ in batch], seed, None, self._abort.is_set)
                except Exception as exc:  # the batch fails, the server keeps serving
                    logger.exception("batch of %d requests failed", len(batch))
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
            self._record(result)
            for (_, future), output in zip(batch, result.outputs):
                if not future.done():
                    future.set_result(output)
            if self._queue:
                self._wake.set()

    # ------------------------------------------------------------------ metrics

    def _record(self, result: RolloutResult) -> None:
        summary = result.summary()
        summary.update(global_steps=self.global_steps, batch=len(result.outputs),
                       weights_version=self.engine.weights_version, drafter_build_seconds=self._rebuild_seconds)
        self._metrics.append(summary)
        logger.info("efficient rollout batch: %s", json.dumps(summary))

    async def get_metrics(self, reset: bool = True) -> list[dict[str, Any]]:
        """The summary of every batch since the last call (what ``RolloutResult.summary`` reports,
        plus weights version, global step and the last drafter build seconds)."""
        metrics = list(self._metrics)
        if reset:
            self._metrics.clear()
        return metrics
