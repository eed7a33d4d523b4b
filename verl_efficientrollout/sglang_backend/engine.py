"""``SGLangEngine``: the rollout engine interface over ``sglang.Engine`` with the int4 self-drafter.

The drafter is SGLang's STANDALONE speculative algorithm pointed at the target's own checkpoint,
quantized online by our plugin's method (``efficient_int4_g32`` etc., the native engine's recipe),
drafting a chain of gamma tokens (``speculative_eagle_topk = 1``). How the controller config maps
onto SGLang: SGLang 0.5.12 fixes the draft length when the engine starts and offers no hook to
change it or to switch drafting off per step or per batch (its adaptive speculation is EAGLE-only),
so the coarsest control is the only one: ``off`` (plain SGLang) or ``always`` with a fixed gamma,
for the engine's lifetime. Any other toggle or draft length is refused with an error naming this.

Weights: ``update_weights`` checks the whole set first (names and shapes against the checkpoint,
dtypes, finite values), then hands it to ``Engine.update_weights_from_tensor``, which SGLang fans
out to the draft model and the target; our plugin re-quantizes the drafter's linears from the new
weights (``plugin``) and reports it, which is where the drafter's version stamp and rebuild time
come from.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from verl_efficientrollout.config import EfficientRolloutConfig
from verl_efficientrollout.controller import per_position_counts
from verl_efficientrollout.engine.base import Request, RequestOutput, RolloutResult, add_into, prompt_error, triage
from verl_efficientrollout.engine.weights import collect_weight_update, served_weight_shapes
from verl_efficientrollout.sglang_backend.compat import (
    check_cpu_engine, platform_env, platform_server_args, received_output_tokens, sglang_version, shutdown_engine,
)
from verl_efficientrollout.sglang_backend.plugin import REPORT_ENV

logger = logging.getLogger(__name__)

def server_args(model: str, config: EfficientRolloutConfig, seed: int = 0) -> dict[str, Any]:
    """The ``sglang.Engine`` keyword arguments for ``config`` (pure; no engine is started)."""
    controller, s = config.controller, config.sglang
    speculative = controller.toggle != "off"
    if speculative and (controller.toggle != "always" or controller.draft_length != "fixed"):
        raise ValueError(
            "engine sglang supports controller.toggle 'off', or 'always' with draft_length 'fixed', got toggle "
            f"{controller.toggle!r} with draft_length {controller.draft_length!r}: SGLang's STANDALONE speculation fixes its draft length when the engine "
            "starts and has no per-step or per-batch hook (its adaptive speculation is EAGLE-only); use engine "
            "native or vllm for the roofline or paper toggle and adaptive or ladder gamma")
    args: dict[str, Any] = dict(
        model_path=model, dtype=s.dtype, context_length=s.max_model_len, max_running_requests=s.max_num_seqs,
        disable_cuda_graph=s.disable_cuda_graph, random_seed=seed, skip_tokenizer_init=True, log_level="warning",
        **platform_server_args(s.mem_fraction_static),
    )
    if s.max_total_tokens:
        args["max_total_tokens"] = s.max_total_tokens
    if speculative:
        args.update(speculative_algorithm="STANDALONE", speculative_draft_model_path=model,
                    speculative_draft_model_quantization=config.drafter.method_name,
                    speculative_num_steps=controller.gamma, speculative_eagle_topk=1,
                    speculative_num_draft_tokens=controller.gamma + 1)
    args.update(s.server_args)
    return args


def _spec_stats(output: RequestOutput, meta: dict, gamma: int) -> tuple[list[int], list[int]]:
    """Fill ``output``'s speculation counts from SGLang's per-request meta info; return its
    (drafted, accepted) per draft position (drafted = verify steps that reached the position)."""
    output.num_verify_steps = int(meta.get("spec_verify_ct", 0))
    output.num_draft_tokens = int(meta.get("spec_num_proposed_drafts", 0))
    output.num_accepted_tokens = int(meta.get("spec_num_correct_drafts", 0))
    histogram = meta.get("spec_correct_drafts_histogram") or []  # [k]: verify steps that accepted k drafts
    accepted = [k for k, steps in enumerate(histogram) for _ in range(int(steps))]
    if not accepted:
        return [], []
    drafted, accepted_per_position = per_position_counts(accepted, [gamma] * len(accepted))
    return list(drafted), list(accepted_per_position)


class SGLangEngine:
    """One ``sglang.Engine`` (its scheduler runs in a process of its own); ``generate`` takes a
    whole rollout batch. SGLang drives its tokenizer manager on an event loop of its own; every
    call into it runs on one thread of ours (``_call``), so callers on any thread, an asyncio
    server's loop included, never run that loop inside theirs."""

    def __init__(self, model: str, config: EfficientRolloutConfig | None = None, seed: int = 0) -> None:
        sglang_version()
        self.config = config or EfficientRolloutConfig(engine="sglang")
        self.model = model
        self.speculative = self.config.controller.toggle != "off"
        self.gamma = self.config.controller.gamma
        args = server_args(model, self.config, seed)  # refuses what SGLang cannot honour, before it starts
        self.weight_shapes, self._tied, self._vocab_size = served_weight_shapes(model)
        for name, value in platform_env().items():
            os.environ.setdefault(name, value)
        handle, report = tempfile.mkstemp(prefix="efficient-sglang-", suffix=".jsonl")
        os.close(handle)
        self._report = Path(report)
        os.environ[REPORT_ENV] = report  # the scheduler process SGLang spawns inherits it
        check_cpu_engine()
        import sglang

        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sglang-engine")
        self.engine = self._call(sglang.Engine, **args)
        self.weights_version = 0
        self.drafter_version: int | None = None
        self.drafter_build_seconds: float | None = None
        self.drafter_fingerprint: float | None = None  # the sum of the weights the drafter was quantized from
        if self.speculative:
            built = self._reports("quantized")
            self.drafter_fingerprint = sum(r["fingerprint"] for r in built)
            done, errors = sum(r["linears"] for r in built), [r["error"] for r in built if r["error"]]
            if errors or not done:
                logger.warning("SGLang's draft model was not quantized to %s (%s): it drafts at full precision "
                               "(lossless, but no cheaper than the target)", self.config.drafter.name,
                               errors[0] if errors else "no linear layer found")
            else:
                self.drafter_version = 0
            self.drafter_build_seconds = sum(r["seconds"] for r in built) if built else None
        self._calls = 0
        self._running: list[str] = []  # the rids of the generate call in flight

    def _call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the engine's own thread (where SGLang's event loop lives)."""
        return self._thread.submit(fn, *args, **kwargs).result()

    def _reports(self, event: str) -> list[dict]:
        """The plugin's records of ``event`` since the last call (they are consumed)."""
        lines = self._report.read_text().splitlines() if self._report.exists() else []
        self._report.write_text("")
        records = [json.loads(line) for line in lines if line.strip()]
        return [r for r in records if r.get("event") == event]

    @property
    def drafter_recipe(self) -> str | None:
        """The drafter's recipe (``int4-asym-g32``, ...), or None when this engine does not speculate."""
        return self.config.drafter.name if self.speculative else None

    def check_request(self, request: Request) -> str | None:
        """Why this engine cannot serve ``request`` (None if it can)."""
        return prompt_error(request, self.config.sglang.max_model_len, self._vocab_size)

    def generate(self, requests: Sequence[Request], seed: int = 0, controller=None,
                 should_abort: Callable[[], bool] | None = None) -> RolloutResult:
        """Generate every request as one batch (SGLang schedules it). ``should_abort`` is polled
        every 10 ms: once it returns True, SGLang aborts every unfinished request, which ends with
        finish reason ``abort`` and its tokens so far. ``controller`` is accepted for the interface
        only: the engine's config fixes the policy. Per-position acceptance and each request's
        draft/accept counts come from SGLang's per-request speculative meta info."""
        start = time.perf_counter()
        outputs, valid = triage(requests, self.check_request)
        result = RolloutResult(outputs=outputs, seconds=0.0)  # type: ignore[arg-type]
        if valid:
            self._calls += 1
            rids = [f"efficient-{self._calls}-{i}" for i in valid]
            finals = self._call(lambda: self.engine.loop.run_until_complete(
                self._run(requests, valid, rids, seed, should_abort)))
            for i, out in zip(valid, finals):
                meta = out.get("meta_info", {})
                reason = (meta.get("finish_reason") or {}).get("type")
                reason = reason if reason in ("stop", "length") else "abort"
                log_probs = None
                if requests[i].logprobs:
                    log_probs = [float(lp[0]) for lp in meta.get("output_token_logprobs") or []]
                outputs[i] = RequestOutput(requests[i].request_id, list(out.get("output_ids") or []), reason,
                                           log_probs=log_probs)
                drafted, accepted = _spec_stats(outputs[i], meta, self.gamma)
                add_into(result.drafted_per_position, drafted)
                add_into(result.accepted_per_position, accepted)
        result.seconds = time.perf_counter() - start
        return result

    async def _run(self, requests, valid, rids, seed, should_abort) -> list[dict]:
        """One ``async_generate`` per request on SGLang's own event loop, and the abort poll."""
        def params(i: int) -> dict:
            r = requests[i]
            return {"temperature": r.sampling.temperature, "top_k": r.sampling.top_k or -1, "top_p": r.sampling.top_p,
                    "max_new_tokens": r.max_new_tokens, "sampling_seed": seed * 1_000_003 + i}

        self._running = list(rids)
        tasks = [asyncio.ensure_future(self.engine.async_generate(
            input_ids=list(requests[i].prompt_ids), sampling_params=params(i), rid=rid,
            return_logprob=requests[i].logprobs)) for i, rid in zip(valid, rids)]
        if should_abort is not None:
            while not all(t.done() for t in tasks):
                if should_abort():
                    for rid, task in zip(rids, tasks):
                        if not task.done():
                            self.engine.tokenizer_manager.abort_request(rid=rid)
                    break
                await asyncio.sleep(0.01)
        return list(await asyncio.gather(*tasks))

    def tokens_so_far(self) -> int:
        """Output tokens SGLang has reported for the current ``generate`` call's requests (in steps of
        SGLang's forced stream interval, 50 tokens): what an abort would hand back at least."""
        return received_output_tokens(self.engine, self._running)

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Load new weights into the target and the drafter (re-quantized from the same tensors).
        The whole set is checked first: a bad update raises ``ValueError`` and the previous weights
        keep serving. A drafter re-quantization that fails leaves its linears dense (the new
        weights, still lossless) with a warning, and no new drafter version."""
        state = collect_weight_update(named_tensors, self.weight_shapes)
        tensors = [(name, tensor.detach().to("cpu").contiguous()) for name, tensor in state.items()]
        self._reports("requantized")  # drop stale records
        ok, message = self._call(self.engine.update_weights_from_tensor, tensors)
        if not ok:
            raise RuntimeError(f"SGLang refused the weight update after our checks passed: {message}")
        self.weights_version += 1
        if self.speculative:
            done = self._reports("requantized")
            self.drafter_fingerprint = sum(r["fingerprint"] for r in done) if done else None
            errors = [r["error"] for r in done if r["error"]]
            self.drafter_build_seconds = sum(r["seconds"] for r in done) if done else None
            if errors or not done:
                logger.warning("the drafter re-quantization after weight update %d failed (%s): SGLang drafts with "
                               "the new weights at full precision until the next update", self.weights_version,
                               errors[0] if errors else "no report from SGLang's draft model")
            else:
                self.drafter_version = self.weights_version
        self.release_kv_cache()

    def release_kv_cache(self) -> None:
        self._call(self.engine.flush_cache)

    def close(self) -> None:
        """Stop this engine's SGLang processes (the engine cannot be used afterwards); other
        engines of this process keep serving."""
        self._call(shutdown_engine, self.engine)
        self._thread.shutdown()
        self._report.unlink(missing_ok=True)
