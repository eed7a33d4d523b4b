"""``VLLMEngine``: the rollout engine interface over ``vllm.LLM`` with the int4 self-drafter.

The drafter is vLLM's ``draft_model`` speculative method pointed at the target's own checkpoint,
quantized online by our plugin's method (``efficient_int4_g32`` etc., the native engine's
recipe), drafting probabilistically so that acceptance is min(1, target/draft). How the
controller config maps onto vLLM:

* toggle ``off``: plain vLLM, no speculative config (the baseline);
* toggle ``always`` with a fixed gamma: K = gamma every step;
* toggle ``threshold``: vLLM's own dynamic table, K = gamma up to the batch-size threshold, 0 above;
* anything else (``roofline``, ``paper``, adaptive or ladder gamma): our ``Controller`` inside
  vLLM's scheduler (``scheduler.EfficientScheduler``) sets K every step.

Weights: ``update_weights`` reloads the target in place and the drafter through vLLM's layerwise
reload, which re-runs the online int4 quantization from the new weights (``worker``).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any, Callable, Iterable, Sequence

from verl_efficientrollout.config import EfficientRolloutConfig
from verl_efficientrollout.engine.base import Request, RequestOutput, RolloutResult, add_into, context_error, triage
from verl_efficientrollout.controller import per_position_counts
from verl_efficientrollout.vllm_backend.compat import (
    platform_engine_args, platform_env, shutdown_llm, supported_engine_args, vllm_version,
)
from verl_efficientrollout.vllm_backend.plugin import quantization_name

WORKER_EXTENSION = "verl_efficientrollout.vllm_backend.worker.EfficientWorkerExtension"
SCHEDULER = "verl_efficientrollout.vllm_backend.scheduler.EfficientScheduler"
SUPPORTED_TOGGLES = ("off", "always", "threshold", "roofline", "paper")


def engine_args(model: str, config: EfficientRolloutConfig, seed: int = 0) -> dict[str, Any]:
    """The ``vllm.LLM`` keyword arguments for ``config`` (pure; no engine is started)."""
    controller, v = config.controller, config.vllm
    if controller.toggle not in SUPPORTED_TOGGLES:
        raise ValueError(f"controller.toggle must be one of {', '.join(SUPPORTED_TOGGLES)} for engine vllm, "
                         f"got {controller.toggle!r}")
    args: dict[str, Any] = dict(
        model=model, dtype=v.dtype, max_model_len=v.max_model_len, max_num_seqs=v.max_num_seqs,
        enforce_eager=v.enforce_eager, seed=seed, worker_extension_cls=WORKER_EXTENSION,
        **platform_engine_args(v.max_model_len),
    )
    if controller.toggle == "off":
        return args
    args["per_request_spec_decode_metrics"] = "detailed"  # per-step draft/accept counts per request
    by_scheduler = controller.toggle in ("roofline", "paper") or controller.draft_length != "fixed"
    speculative: dict[str, Any] = {
        "method": "draft_model", "model": model, "quantization": quantization_name(config.drafter),
        "num_speculative_tokens": {"fixed": controller.gamma, "adaptive": controller.gamma_max,
                                   "ladder": max(controller.paper_ladder)}[controller.draft_length],
        "draft_sample_method": "probabilistic",
    }
    if by_scheduler:  # our controller decides K every step inside vLLM's scheduler
        args["scheduler_cls"] = SCHEDULER
        args["additional_config"] = {"efficient": {"controller": dataclasses.asdict(controller)}}
    elif controller.toggle == "threshold":
        n = controller.threshold_batch_size
        table = [(1, max(n, 1), controller.gamma if n >= 1 else 0)]
        if n < v.max_num_seqs:
            table.append((max(n, 1) + 1, v.max_num_seqs, 0))
        speculative["num_speculative_tokens_per_batch_size"] = table
    args["speculative_config"] = speculative
    return args


def _spec_stats(output: RequestOutput, metrics) -> tuple[list[int], list[int]]:
    """Fill ``output``'s speculation counts from vLLM's per-request metrics; return its
    (drafted, accepted) per draft position (drafted = verify steps that reached the position)."""
    steps = [(a, d) for a, d in zip(metrics.per_step_accepted, metrics.per_step_drafted) if d > 0]
    output.num_draft_tokens = sum(d for _, d in steps)
    output.num_accepted_tokens = sum(a for a, _ in steps)
    output.num_verify_steps = len(steps)
    drafted, accepted = per_position_counts([a for a, _ in steps], [d for _, d in steps])
    return list(drafted), list(accepted)


class VLLMEngine:
    """One ``vllm.LLM``; ``generate`` takes a whole rollout batch (vLLM schedules it)."""

    def __init__(self, model: str, config: EfficientRolloutConfig | None = None, seed: int = 0) -> None:
        vllm_version()
        from vllm import LLM

        self.config = config or EfficientRolloutConfig(engine="vllm")
        self.model = model
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(max(1, round(self.config.vllm.cpu_kv_cache_gib)))))
        for name, value in platform_env().items():
            os.environ.setdefault(name, value)
        self.speculative = self.config.controller.toggle != "off"
        self.llm = LLM(**supported_engine_args(engine_args(model, self.config, seed)))
        self.weights_version = 0
        self.drafter_build_seconds: float | None = None

    def check_request(self, request: Request) -> str | None:
        return context_error(request, self.config.vllm.max_model_len)

    def generate(self, requests: Sequence[Request], seed: int = 0, controller=None,
                 should_abort: Callable[[], bool] | None = None) -> RolloutResult:
        """Generate every request in one ``LLM.generate`` call. ``controller`` and ``should_abort``
        are accepted for the interface but not used yet: the engine's config fixes the policy
        (off / always / threshold) and a call runs to completion. Per-position acceptance and each
        request's draft/accept counts come from vLLM's per-request spec-decode metrics."""
        from vllm import SamplingParams as VLLMSamplingParams

        start = time.perf_counter()
        outputs, valid = triage(requests, self.check_request)
        result = RolloutResult(outputs=outputs, seconds=0.0)  # type: ignore[arg-type]
        if valid:
            prompts = [{"prompt_token_ids": list(requests[i].prompt_ids)} for i in valid]
            params = [
                VLLMSamplingParams(
                    temperature=r.sampling.temperature, top_k=r.sampling.top_k or -1, top_p=r.sampling.top_p,
                    max_tokens=r.max_new_tokens, seed=seed * 1_000_003 + i, logprobs=0 if r.logprobs else None)
                for i, r in ((i, requests[i]) for i in valid)
            ]
            for i, out in zip(valid, self.llm.generate(prompts, params, use_tqdm=False)):
                completion = out.outputs[0]
                log_probs = None
                if requests[i].logprobs and completion.logprobs is not None:
                    log_probs = [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs)]
                reason = completion.finish_reason if completion.finish_reason in ("stop", "length") else "abort"
                outputs[i] = RequestOutput(requests[i].request_id, list(completion.token_ids), reason,
                                           log_probs=log_probs)
                metrics = getattr(completion, "spec_decode_metrics", None)
                if metrics is not None:
                    drafted, accepted = _spec_stats(outputs[i], metrics)
                    add_into(result.drafted_per_position, drafted)
                    add_into(result.accepted_per_position, accepted)
        result.seconds = time.perf_counter() - start
        return result

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]], refresh_drafter: bool = True) -> None:
        """Reload the target in place, then the drafter (re-quantized from the same tensors).
        ``refresh_drafter=False`` leaves the drafter stale (for comparisons only)."""
        refresh = refresh_drafter and self.speculative
        from safetensors.torch import save_file

        weights = {name: tensor.detach().to("cpu").contiguous() for name, tensor in named_tensors}
        # vLLM's RPC serializer does not carry tensors: hand the workers a file (in RAM where possible).
        directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryDirectory(dir=directory, prefix="efficient-weights-") as tmp:
            path = os.path.join(tmp, "weights.safetensors")
            save_file(weights, path)
            reports = self.llm.collective_rpc("efficient_load_weights", args=(path, refresh))
        self.drafter_build_seconds = max(r["drafter_seconds"] or 0.0 for r in reports) if refresh else None
        self.llm.reset_prefix_cache()
        self.weights_version += 1

    def release_kv_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Stop vLLM's engine processes (the engine cannot be used afterwards)."""
        shutdown_llm(self.llm)
