"""``VLLMEngine``: the rollout engine interface over ``vllm.LLM`` with the int4 self-drafter.

The drafter (``vllm.proposer: self``, the default) is our proposer inside vLLM's V1 model runner
(``selfspec``, installed through ``ParallelConfig.worker_cls``): an int4 view of the target that
shares its embeddings, lm_head, norms and KV cache and runs nothing at K = 0, drafting
probabilistically so that acceptance is min(1, target/draft). ``vllm.proposer: draft-model`` is
the old route, kept for comparison: vLLM's ``draft_model`` method pointed at the target's own
checkpoint, quantized online by our plugin's method (``efficient_int4_g32`` etc.), with a KV cache
of its own and a drafter forward every step. Where the self-drafter cannot run (a vLLM without
the internals it takes, another model layout: ``compat.self_spec_unsupported``) the engine warns
and takes the draft_model route. How the controller config maps onto vLLM:

* toggle ``off``: plain vLLM, no speculative config (the baseline);
* toggle ``always`` with a fixed gamma: K = gamma every step;
* anything else (``threshold``, ``roofline``, ``paper``, adaptive or ladder gamma): our ``Controller``
  inside vLLM's scheduler (``scheduler.EfficientScheduler``) sets K every step. Not vLLM's own
  batch-size table (``num_speculative_tokens_per_batch_size``) for ``threshold``: with it vLLM's V1
  runner switches the whole engine's CUDA graphs to piecewise (0.32, ``VllmConfig
  ._maybe_override_dynamic_sd_cudagraph_mode``); our scheduler writes the same per-step K into vLLM's
  dynamic lookup without that override.

Weights: ``update_weights`` (this standalone engine's route, used by the benchmarks and tests;
verl's server syncs through verl's own path, ``verl_worker``) reloads the target in place, the
self-drafter re-quantized from each linear the target loaded, as under verl (or the draft model
reloaded, whose online int4 quantization re-runs: ``worker``). The tensors reach vLLM's worker
processes as a safetensors file in /dev/shm: vLLM's RPC serializer does not carry tensors.

Under verl (``rollout.name=efficient``, ``engine: vllm``) this engine is not used: verl's own
vLLM server serves (``verl_adapter.vllm_rollout``) with the same engine arguments
(``speculation_args``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from typing import Any, Callable, Iterable, Sequence

from verl_efficientrollout.config import EfficientRolloutConfig
from verl_efficientrollout.engine.base import Request, RequestOutput, RolloutResult, add_into, prompt_error, triage
from verl_efficientrollout.controller import per_position_counts
from verl_efficientrollout.engine.weights import collect_weight_update, served_weight_shapes
from verl_efficientrollout.vllm_backend.compat import (
    is_vllm_cpu_build, platform_engine_args, platform_env, run_requests, self_spec_unsupported,
    self_spec_worker_qualname, shutdown_llm,
    spec_decode_counters, supported_engine_args, vllm_version,
)

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "verl_efficientrollout.vllm_backend.worker.EfficientWorkerExtension"
SCHEDULER = "verl_efficientrollout.vllm_backend.scheduler.EfficientScheduler"
EXECUTOR = "verl_efficientrollout.vllm_backend.executor.EfficientMultiprocExecutor"  # executor.QUALNAME
SUPPORTED_TOGGLES = ("off", "always", "threshold", "roofline", "paper")


def engine_args(model: str, config: EfficientRolloutConfig, seed: int = 0,
                calibration: dict[str, Any] | None = None, proposer: str | None = None) -> dict[str, Any]:
    """The ``vllm.LLM`` keyword arguments for ``config`` (pure; no engine is started).
    ``calibration`` (``{"gammas", "hold_steps", "log"}``): our scheduler cycles K through the
    gammas and logs step times instead of running the controller (``vllm_backend.calibrate``).
    ``proposer``: the drafter route decided for this engine (default ``config.vllm.proposer``)."""
    controller, v = config.controller, config.vllm
    args: dict[str, Any] = dict(
        model=model, dtype=v.dtype, max_model_len=v.max_model_len, max_num_seqs=v.max_num_seqs,
        enforce_eager=v.enforce_eager, seed=seed, worker_extension_cls=WORKER_EXTENSION,
        **platform_engine_args(v.max_model_len, v.gpu_memory_utilization),
    )
    multiprocess = is_vllm_cpu_build() or int(v.llm_args.get("tensor_parallel_size") or 1) > 1
    args.update(speculation_args(model, config, proposer or v.proposer, calibration,
                                 executor=v.llm_args.get("distributed_executor_backend") or
                                 ("mp" if multiprocess else "uni")))
    return {**args, **v.llm_args}


def speculation_args(model: str, config: EfficientRolloutConfig, proposer: str = "self",
                     calibration: dict[str, Any] | None = None, executor: str = "mp") -> dict[str, Any]:
    """The vLLM engine arguments that add our parts to a plain engine (pure): ``speculative_config``
    (the drafter route, the draft length), ``worker_cls`` (the self-drafter's runner),
    ``scheduler_cls`` (our controller deciding K every step), ``additional_config["efficient"]``
    (what those read), per-request spec-decode metrics, and, where the engine would run vLLM's
    multiprocess executor (``executor`` "mp"), its subclass that spares a K = 0 step the draft
    round trip (``executor.EfficientMultiprocExecutor``). Empty for toggle ``off``. Shared by
    ``VLLMEngine`` and verl's own vLLM server (``verl_adapter.vllm_rollout``)."""
    controller, v = config.controller, config.vllm
    if controller.toggle not in SUPPORTED_TOGGLES:
        raise ValueError(f"controller.toggle must be one of {', '.join(SUPPORTED_TOGGLES)} for engine vllm, "
                         f"got {controller.toggle!r}")
    if controller.toggle == "off":
        return {}
    args: dict[str, Any] = {"per_request_spec_decode_metrics": "detailed"}  # per-step counts per request (>= 0.32)
    by_scheduler = controller.toggle in ("threshold", "roofline", "paper") or controller.draft_length != "fixed"
    speculative: dict[str, Any] = {
        "method": "draft_model", "model": model,
        "num_speculative_tokens": {"fixed": controller.gamma, "adaptive": controller.gamma_max,
                                   "ladder": max(controller.paper_ladder)}[controller.draft_length],
        "draft_sample_method": "probabilistic",
    }
    extra: dict[str, Any] = {}
    if proposer == "self":  # our worker's runner drafts with the int4 view of the target
        args["worker_cls"] = self_spec_worker_qualname()
        if executor == "mp":
            args["distributed_executor_backend"] = EXECUTOR
        args["async_scheduling"] = False
        extra["drafter"] = {"recipe": config.drafter.recipe, "group_size": config.drafter.group_size}
    else:  # vLLM's draft model, quantized online by our plugin's method
        speculative["quantization"] = config.drafter.method_name
    if calibration is not None:
        speculative["num_speculative_tokens"] = max(calibration["gammas"])
    if by_scheduler or calibration is not None:  # our controller decides K every step inside vLLM's scheduler
        args["scheduler_cls"] = SCHEDULER
        extra["controller"] = dataclasses.asdict(controller)
        extra["structure"] = "native" if proposer == "self" else "draft-model"
        if calibration is not None:
            extra["calibration"] = dict(calibration)
    args["speculative_config"] = speculative
    if extra:
        args["additional_config"] = {"efficient": extra}
    return args


def choose_proposer(model: str, config: EfficientRolloutConfig) -> str:
    """``config.vllm.proposer``, or the draft_model route, with a warning naming why and what it
    costs, where the self-drafter cannot run on this vLLM or this model."""
    if config.vllm.proposer == "draft-model":
        return "draft-model"
    reason = self_spec_unsupported(model)
    if reason is None:
        return "self"
    logger.warning("the int4 self-drafter cannot run here (%s): falling back to vLLM's draft_model route, whose "
                   "drafter keeps a KV cache of its own (half the KV capacity on the same budget) and runs a "
                   "forward every step, K = 0 included (about 2x plain vLLM's time on a CPU, measured)", reason)
    return "draft-model"


def verified_steps(metrics) -> list[tuple[int, int]]:
    """(accepted, drafted) of each verify step in vLLM's per-request spec-decode metrics (a step
    that verified no draft is not a verify step)."""
    return [(a, d) for a, d in zip(metrics.per_step_accepted, metrics.per_step_drafted) if d > 0]


def _spec_stats(output: RequestOutput, metrics) -> tuple[list[int], list[int]]:
    """Fill ``output``'s speculation counts from vLLM's per-request metrics; return its
    (drafted, accepted) per draft position (drafted = verify steps that reached the position)."""
    steps = verified_steps(metrics)
    output.num_draft_tokens = sum(d for _, d in steps)
    output.num_accepted_tokens = sum(a for a, _ in steps)
    output.num_verify_steps = len(steps)
    drafted, accepted = per_position_counts([a for a, _ in steps], [d for _, d in steps])
    return list(drafted), list(accepted)


class VLLMEngine:
    """One ``vllm.LLM``; ``generate`` takes a whole rollout batch (vLLM schedules it)."""

    def __init__(self, model: str, config: EfficientRolloutConfig | None = None, seed: int = 0,
                 calibration: dict[str, Any] | None = None) -> None:
        vllm_version()
        from vllm import LLM

        self.config = config or EfficientRolloutConfig(engine="vllm")
        self.model = model
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(max(1, round(self.config.vllm.cpu_kv_cache_gib)))))
        for name, value in platform_env().items():
            os.environ.setdefault(name, value)
        self.speculative = self.config.controller.toggle != "off"
        # what an update must send (checked before vLLM starts)
        self.weight_shapes, self._tied, self._vocab_size = served_weight_shapes(model)
        self.proposer = choose_proposer(model, self.config) if self.speculative else None
        if self.proposer == "self":
            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # V2 has another drafter interface
        args = supported_engine_args(engine_args(model, self.config, seed, calibration, self.proposer))
        # Without per-request metrics (vLLM < 0.32) a rollout's counts come from vLLM's own counters,
        # which need stats logging (off otherwise: on a CPU it costs several percent of a step).
        self._counters = self.speculative and "per_request_spec_decode_metrics" not in args
        if self._counters:
            args.setdefault("disable_log_stats", False)
        self.llm = LLM(**args)
        self.weights_version = 0
        self.drafter_build_seconds: float | None = None
        self.drafter_off: str | None = None  # why the self-drafter is off (plain decoding), if it is
        if self.proposer == "self":
            self._note_drafter(self.drafter_status().get("disabled"))

    @property
    def weight_bytes(self) -> int:
        """Bytes of the target's weights in the engine's dtype (a tied head counted once)."""
        import math

        import torch

        element = torch.tensor([], dtype=getattr(torch, self.config.vllm.dtype)).element_size()
        return sum(math.prod(shape) for shape in self.weight_shapes.values()) * element

    def drafter_status(self) -> dict:
        """The drafter of this engine's first worker (``efficient_drafter_status``): its route, and
        for the self-drafter its build report (recipe, bytes, seconds), whether it is off and why,
        and the forwards it ran."""
        return self.llm.collective_rpc("efficient_drafter_status")[0] if self.speculative else {"route": None}

    def _note_drafter(self, disabled: str | None) -> None:
        if disabled and disabled != self.drafter_off:
            logger.warning("vLLM engine decodes without speculation until the next weight update: %s", disabled)
        self.drafter_off = disabled

    def check_request(self, request: Request) -> str | None:
        """Why this engine cannot serve ``request`` (None if it can)."""
        return prompt_error(request, self.config.vllm.max_model_len, self._vocab_size)

    def generate(self, requests: Sequence[Request], seed: int = 0, controller=None,
                 should_abort: Callable[[], bool] | None = None) -> RolloutResult:
        """Generate every request as one batch on vLLM's engine (``compat.run_requests``: vLLM
        schedules it). ``should_abort`` is polled between engine steps: once it returns True, every
        unfinished request ends with finish reason ``abort`` and its tokens so far. ``controller``
        is accepted for the interface only: the engine's config fixes the policy (off / always /
        threshold, or our controller inside vLLM's scheduler). Per-position acceptance and each
        request's draft/accept counts come from vLLM's per-request spec-decode metrics (vLLM >= 0.32);
        on older vLLM, from the change of vLLM's own counters over the call (whole-rollout counts
        only: concurrent calls on one engine would mix)."""
        from vllm import SamplingParams as VLLMSamplingParams

        start = time.perf_counter()
        outputs, valid = triage(requests, self.check_request)
        result = RolloutResult(outputs=outputs, seconds=0.0)  # type: ignore[arg-type]
        before = spec_decode_counters(self.llm) if self._counters and valid else None
        if valid:
            prompts = [{"prompt_token_ids": list(requests[i].prompt_ids)} for i in valid]
            params = [
                VLLMSamplingParams(
                    temperature=r.sampling.temperature, top_k=r.sampling.top_k or -1, top_p=r.sampling.top_p,
                    max_tokens=r.max_new_tokens, seed=seed * 1_000_003 + i, logprobs=0 if r.logprobs else None)
                for i, r in ((i, requests[i]) for i in valid)
            ]
            finals = run_requests(self.llm, prompts, params, should_abort)
            for i, out in zip(valid, finals):
                if out is None:  # aborted before its first token
                    outputs[i] = RequestOutput(requests[i].request_id, [], "abort")
                    continue
                completion = out.outputs[0]
                log_probs = None
                if requests[i].logprobs and completion.logprobs is not None:
                    log_probs = [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs)]
                reason = completion.finish_reason if out.finished and completion.finish_reason in ("stop", "length") \
                    else "abort"
                outputs[i] = RequestOutput(requests[i].request_id, list(completion.token_ids), reason,
                                           log_probs=log_probs)
                metrics = getattr(completion, "spec_decode_metrics", None)
                if metrics is not None:
                    drafted, accepted = _spec_stats(outputs[i], metrics)
                    add_into(result.drafted_per_position, drafted)
                    add_into(result.accepted_per_position, accepted)
        after = spec_decode_counters(self.llm) if before is not None else None
        if after is not None:  # whole-rollout counts only: each request's own stay 0
            drafts = after[0] - before[0]
            accepted = [a - (before[1][i] if i < len(before[1]) else 0) for i, a in enumerate(after[1])]
            add_into(result.drafted_per_position, [drafts] * len(accepted) if drafts else [])
            add_into(result.accepted_per_position, accepted if drafts else [])
        result.seconds = time.perf_counter() - start
        return result

    @property
    def drafter_recipe(self) -> str | None:
        """The drafter's recipe (``int4-asym-g32``, ...), or None when this engine does not speculate."""
        return self.config.drafter.name if self.speculative and not self.drafter_off else None

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]], refresh_drafter: bool = True) -> None:
        """Reload the target in place, then the drafter (re-quantized from the same tensors).
        The whole set is checked first against the checkpoint's names and shapes (dtype, finite
        values, a stream that fails half-way): a bad update raises ``ValueError`` and the previous
        weights keep serving. ``refresh_drafter=False`` leaves the drafter stale (for comparisons only)."""
        refresh = refresh_drafter and self.speculative
        from safetensors.torch import save_file

        state = collect_weight_update(named_tensors, self.weight_shapes)
        if self._tied and "lm_head.weight" not in state:  # vLLM's reload does not re-tie: without it
            state["lm_head.weight"] = state["model.embed_tokens.weight"]  # the old head would keep serving
        weights, seen = {}, set()
        for name, tensor in state.items():  # a tied lm_head goes too: vLLM's drafter reload needs it
            tensor = tensor.detach().to("cpu").contiguous()
            if tensor.untyped_storage().data_ptr() in seen:  # safetensors refuses shared memory
                tensor = tensor.clone()
            seen.add(tensor.untyped_storage().data_ptr())
            weights[name] = tensor
        # vLLM's RPC serializer does not carry tensors: hand the workers a file (in RAM where possible).
        directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryDirectory(dir=directory, prefix="efficient-weights-") as tmp:
            path = os.path.join(tmp, "weights.safetensors")
            save_file(weights, path)
            reports = self.llm.collective_rpc("efficient_load_weights", args=(path, refresh))
        self.drafter_build_seconds = max(r["drafter_seconds"] or 0.0 for r in reports) if refresh else None
        errors = [r["drafter_error"] for r in reports if r.get("drafter_error")]
        if self.proposer == "self" and refresh:
            self._note_drafter(errors[0] if errors else None)  # off until the next good update
        elif errors:
            logger.warning("the drafter refresh failed after the target was updated (%s): vLLM keeps drafting with "
                           "the drafter as the failed reload left it; outputs stay lossless, acceptance may drop "
                           "until the next update refreshes it", errors[0])
        self.llm.reset_prefix_cache()
        self.weights_version += 1

    def release_kv_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Stop vLLM's engine processes (the engine cannot be used afterwards)."""
        shutdown_llm(self.llm)
