"""The native rollout engine: PyTorch + a lean decoder, plain or self-speculative decoding per step.

Data path of one ``generate`` call (a rollout batch: prompts x samples):

1. prefill each distinct prompt once and copy its KV into the slots of its samples;
2. every decode step, ask the controller; then either
   * a plain step: one target forward for the active rows, sample one token each, or
   * a speculative step: gamma drafter forwards on the target's own KV cache (the drafter writes
     only the drafted positions), one target verify forward over gamma + 1 tokens (overwriting
     those positions), lossless rejection sampling, commit ``accepted + 1`` tokens per row;
3. rows that hit EOS or their token budget leave the batch: the KV of the rows that stay moves
   down so the active rows always fill the cache's first slots (attention reads a view, never a
   gather), and step cost follows the active batch. Nothing is copied on rollback: positions past
   a row's committed length are never attended and are overwritten by its next write.

A decode step reads the device once, after its last kernel (accepted counts and tokens together);
its forwards go through ``graphs.StepRunner`` (CUDA graphs per batch bucket on a GPU).
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from dataclasses import replace
from typing import Callable, Iterable, Sequence

import torch

from verl_efficientrollout.config import EfficientRolloutConfig, NativeEngineConfig
from verl_efficientrollout.controller import Controller, Decision, EngineState, StepObservation, per_position_counts
from verl_efficientrollout.drafter import Drafter, DrafterBuildError, build_drafter
from verl_efficientrollout.engine.base import Request, RequestOutput, RolloutResult, add_into, prompt_error, triage
from verl_efficientrollout.engine.graphs import StepRunner, resolve_mode
from verl_efficientrollout.engine.model import DecoderLM, KVCache, ModelArgs
from verl_efficientrollout.engine.weights import collect_weight_update
from verl_efficientrollout.models import load_target, torch_dtype
from verl_efficientrollout._mutations import injected_bug
from verl_efficientrollout.rejection import rejection_sample
from verl_efficientrollout.sampling import logits_to_probs, sample, sampling_tensors, token_logprobs

logger = logging.getLogger(__name__)

_PREFILL_CHUNK = 8  # distinct prompts per prefill forward


class NativeEngine:
    def __init__(
        self,
        hf_model,
        config: EfficientRolloutConfig | None = None,
        engine_config: NativeEngineConfig | None = None,
        tokenizer=None,
    ) -> None:
        """Serve a loaded transformers causal LM (its weights are copied into the lean decoder)."""
        self.config = config or EfficientRolloutConfig()
        self.engine_config = engine_config = resolve_device(engine_config or self.config.native)
        self.tokenizer = tokenizer
        eos = hf_model.generation_config.eos_token_id if hf_model.generation_config else None
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        tied = getattr(hf_model.config, "tie_word_embeddings", False)
        state = hf_model.state_dict()
        self.weight_shapes = {name: tuple(t.shape) for name, t in state.items() if not (tied and name == "lm_head.weight")}
        self.weights_version = 0
        self.controller = Controller(self.config.controller)
        self._cache: KVCache | None = None
        self.runner = StepRunner(resolve_mode(engine_config.decode_graphs, engine_config.device), engine_config.device)
        # dtype 'auto': measured here, on this device (None when the dtype was given).
        self.dtype_choice: dict | None = None
        if engine_config.dtype == "auto":
            self.dtype_choice = choose_dtype(hf_model, self.config, engine_config)
            self.engine_config = engine_config = replace(engine_config, dtype=self.dtype_choice["dtype"])
            logger.info("native engine dtype %s (%s)", engine_config.dtype, self.dtype_choice["reason"])
        self.target = DecoderLM.from_hf(hf_model, dtype=torch_dtype(engine_config.dtype), device=engine_config.device,
                                        pack_cpu_linears=engine_config.pack_cpu_linears,
                                        cpu_decode_ops=engine_config.cpu_decode_ops)
        self.drafter: Drafter | None = self._build_drafter()

    @classmethod
    def load(
        cls, model: str = "default", config: EfficientRolloutConfig | None = None,
        engine_config: NativeEngineConfig | None = None,
    ) -> "NativeEngine":
        """Load ``model`` ('default' or a local HF directory) and serve it."""
        engine_config = resolve_device(engine_config or (config or EfficientRolloutConfig()).native)
        load_dtype = engine_config.dtype
        if load_dtype == "auto":  # fp32 holds both candidates exactly; CUDA always takes bf16
            load_dtype = "bfloat16" if torch.device(engine_config.device).type == "cuda" else "float32"
        hf_model, tokenizer = load_target(model, dtype=load_dtype, device=engine_config.device)
        return cls(hf_model, config, engine_config, tokenizer)

    # ---------------------------------------------------------------- weights

    def _build_drafter(self) -> Drafter | None:
        """The int4 drafter of the current weights, or None (plain decoding, one warning) if the
        build fails for any reason: a drafter problem never stops a rollout or a weight update."""
        try:
            return build_drafter(self.target, self.config.drafter, self.weights_version)
        except DrafterBuildError as exc:
            logger.warning("no drafter, decoding without speculation: %s", exc)
        except Exception as exc:  # torchao / kernel errors: same fallback, say what it was
            logger.warning("no drafter, decoding without speculation until the next weight update: drafter build "
                           "failed with %s: %s", type(exc).__name__, exc)
        return None

    @property
    def drafter_recipe(self) -> str | None:
        """The serving drafter's recipe (``int4-asym-g32``, ...), or None while decoding plain."""
        return self.drafter.report.recipe if self.drafter is not None else None

    @property
    def drafter_build_seconds(self) -> float | None:
        return self.drafter.report.build_seconds if self.drafter is not None else None

    def _disable_drafter(self, reason: str) -> None:
        """Stop speculating on this engine until the next weight update rebuilds the drafter."""
        logger.warning("speculation switched off for this engine until the next weight update: %s", reason)
        self.drafter = None

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load a complete set of new target weights (HF names, as veRL sends them), then rebuild
        the drafter. Incomplete, unknown or mis-shaped updates raise ``ValueError`` and the
        previous weights keep serving."""
        state = collect_weight_update(named_tensors, self.weight_shapes)
        param = self.target.embed_tokens.weight
        self.target.load_hf_state_dict(state, dtype=param.dtype, device=param.device)
        self.weights_version += 1
        # The old drafter sits in reference cycles (torchao's tensor subclasses): collect it now, before
        # the new one is built, not at some later full GC (a drafter's worth of memory per update otherwise).
        self.drafter = None
        self.runner.reset()  # captured graphs point at the old weights
        gc.collect()
        self.drafter = self._build_drafter()

    # ---------------------------------------------------------------- generation

    def check_request(self, request: Request) -> str | None:
        """Why this engine cannot serve ``request`` (None if it can)."""
        return prompt_error(request, self.engine_config.max_model_len, self.target.args.vocab_size)

    def generate(
        self, requests: Sequence[Request], seed: int = 0, controller: Controller | None = None,
        should_abort: Callable[[], bool] | None = None,
    ) -> RolloutResult:
        """Generate every request; a request this engine cannot serve gets an error output alone.

        ``should_abort`` is polled before every decode step; once it returns True every unfinished
        request ends with finish reason ``abort`` and the tokens it has so far."""
        start = time.perf_counter()
        outputs, valid = triage(requests, self.check_request)
        result = RolloutResult(outputs=[], seconds=0.0)
        if valid:
            controller = controller or self.controller
            generator = torch.Generator(device=self.engine_config.device).manual_seed(seed)
            rows = self._run([requests[i] for i in valid], controller, generator, result, should_abort)
            for i, row in zip(valid, rows):
                outputs[i] = row
            result.controller = controller.stats.to_dict()
        result.outputs = outputs  # type: ignore[assignment]
        result.seconds = time.perf_counter() - start
        return result

    def release_kv_cache(self) -> None:
        """Free the KV cache (the next ``generate`` allocates a fresh one)."""
        self._cache = None
        self.runner.reset()
        if torch.device(self.engine_config.device).type == "cuda":
            torch.cuda.empty_cache()

    def _kv_cache(self, slots: int, max_len: int) -> KVCache:
        cache = self._cache
        slots = self.runner.slots_needed(slots)
        if cache is None or cache.k.shape[1] < slots or cache.max_len < max_len:
            self._cache = None  # free the old one first
            self.runner.reset()  # graphs address the old cache
            cache = self._cache = KVCache(self.target.args, slots, max_len, self.target.dtype, self.engine_config.device)
        return cache

    @torch.inference_mode()
    def _run(self, requests: list[Request], controller: Controller, generator: torch.Generator,
             result: RolloutResult, should_abort: Callable[[], bool] | None) -> list[RequestOutput]:
        device = self.engine_config.device
        n = len(requests)
        longest_draft = controller.config.longest_draft
        cache = self._kv_cache(n, max(len(r.prompt_ids) + r.max_new_tokens for r in requests) + longest_draft + 1)
        temperature, top_k, top_p = sampling_tensors([r.sampling for r in requests], device)
        filtered = any(r.sampling.top_k > 0 or r.sampling.top_p < 1 for r in requests)
        any_greedy = any(r.sampling.temperature == 0 for r in requests)
        lengths = [len(r.prompt_ids) for r in requests]  # committed tokens in KV, per row (host)
        device_lengths = torch.tensor(lengths, device=device)

        prefill_start = clock(device)
        first_logits = self._prefill(requests, cache)  # [n, vocab]; row r in slot r
        result.prefill_seconds = clock(device) - prefill_start
        first_probs = logits_to_probs(first_logits, temperature, top_k, top_p, filtered, any_greedy)
        last = sample(first_probs, generator)  # [n] not in KV
        generated: list[list[int]] = [[int(t)] for t in last]
        want_logprobs = any(r.logprobs for r in requests)
        logprobs: list[list[float]] = [[x] for x in token_logprobs(first_logits, temperature, last).tolist()] \
            if want_logprobs else [[] for _ in range(n)]
        spec = [[0, 0, 0] for _ in range(n)]  # per row: draft tokens, accepted, verify steps
        reasons = [self._finish_reason(generated[row], requests[row].max_new_tokens, 0) for row in range(n)]
        active_rows = [row for row in range(n) if reasons[row] is None]  # active_rows[i] sits in KV slot i
        _compact(cache, list(range(n)), active_rows, lengths)

        controller.begin_rollout()
        step = 0
        while active_rows:
            if should_abort is not None and should_abort():
                for row in active_rows:
                    reasons[row] = "abort"
                break
            batch = len(active_rows)
            active = torch.tensor(active_rows, device=device)
            state = EngineState(batch, sum(lengths[row] for row in active_rows) + batch, step, n)
            decision = controller.decide(state)
            if decision.speculate and self.drafter is None:
                decision = Decision(False, 0, decision.predicted_speedup, "no drafter")
            step_start = time.perf_counter()
            marks = _Marks(device)
            params = (temperature[active], top_k[active], top_p[active], filtered, any_greedy)
            row_lengths = device_lengths[active]  # [batch]
            longest = max(lengths[row] for row in active_rows)
            row_drafts = [min(decision.gamma, max(0, requests[row].max_new_tokens - len(generated[row]) - 1))
                          for row in active_rows] if decision.speculate else [0] * batch
            if decision.speculate:
                new_tokens, num_accepted, target_logits, finite = self._speculative_step(
                    cache, row_lengths, longest, last[active], torch.tensor(row_drafts, device=device),
                    decision.gamma, params, generator, marks)
            else:
                new_tokens, num_accepted, target_logits, finite = self._plain_step(
                    cache, row_lengths, longest, last[active], params, generator, marks)
            marks.mark()
            logprobs_of = (lambda logits, tokens: token_logprobs(logits, params[0], tokens)) if want_logprobs else None
            row_accepted, row_tokens, step_logprobs, healthy = _read_step(num_accepted, new_tokens, finite,
                                                                          target_logits, logprobs_of)
            if not healthy:  # the drafter produced NaN/inf: redo this step plain
                self._disable_drafter(f"the drafter ({self.drafter.report.recipe}) produced NaN or inf logits")
                decision = Decision(False, 0, decision.predicted_speedup, "drafter fault")
                row_drafts = [0] * batch
                marks = _Marks(device)
                new_tokens, num_accepted, target_logits, _ = self._plain_step(
                    cache, row_lengths, longest, last[active], params, generator, marks)
                marks.mark()
                row_accepted, row_tokens, step_logprobs, _ = _read_step(num_accepted, new_tokens, None, target_logits,
                                                                        logprobs_of)
            if decision.speculate:
                for row, drafts, accepted_tokens in zip(active_rows, row_drafts, row_accepted):
                    if drafts:
                        spec[row][0] += drafts
                        spec[row][1] += accepted_tokens
                        spec[row][2] += 1
                drafted, accepted = per_position_counts(row_accepted, row_drafts)
                add_into(result.drafted_per_position, drafted)
                add_into(result.accepted_per_position, accepted)
                obs = StepObservation(decision, state.batch_size, state.total_context, drafted, accepted,
                                      draft_seconds=marks.seconds(0, 1), verify_seconds=marks.seconds(1, 2))
            else:
                obs = StepObservation(decision, state.batch_size, state.total_context,
                                      target_seconds=marks.seconds(0, 1))
            controller.observe(obs)
            # Commit: the previous last token and the accepted drafts are now in the KV cache.
            device_lengths[active] += num_accepted + 1
            last[active] = new_tokens[torch.arange(batch, device=device), num_accepted]
            keep = []
            for row, accepted_tokens, tokens, row_logprobs in zip(active_rows, row_accepted, row_tokens, step_logprobs):
                lengths[row] += accepted_tokens + 1
                start = len(generated[row])
                generated[row].extend(tokens[: accepted_tokens + 1])
                logprobs[row].extend(row_logprobs[: accepted_tokens + 1])
                reasons[row] = self._finish_reason(generated[row], requests[row].max_new_tokens, start)
                if reasons[row] is None:
                    keep.append(row)
            result.steps.append((batch, decision.speculate, decision.gamma, time.perf_counter() - step_start,
                                 sum(row_accepted)))
            if len(keep) < batch:
                _compact(cache, active_rows, keep, lengths)
                active_rows = keep
            step += 1
        return [
            RequestOutput(request.request_id, generated[row], reasons[row],
                          log_probs=logprobs[row][: len(generated[row])] if request.logprobs else None,
                          num_draft_tokens=spec[row][0], num_accepted_tokens=spec[row][1], num_verify_steps=spec[row][2])
            for row, request in enumerate(requests)
        ]

    @torch.inference_mode()
    def measure_step_costs(
        self, batch_sizes: Sequence[int], context: int, gammas: Sequence[int] = (2, 6), repeats: int = 3
    ) -> list[dict]:
        """Median seconds of a target step, a drafter step and a verify of gamma + 1 tokens per
        row (each gamma), at each batch size, every row at ``context`` tokens (the KV content
        does not matter). The records are what ``controller.fit_profile`` takes."""
        measurements = []
        device = self.engine_config.device
        for batch in batch_sizes:
            cache = self._kv_cache(batch, context + max(gammas) + 2)

            def inputs(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
                ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)
                return ids, context + torch.arange(tokens, device=device).expand(batch, -1)

            runs = [("target", 0, self.target, *inputs(1))]
            runs += [("verify", gamma, self.target, *inputs(gamma + 1)) for gamma in gammas]
            if self.drafter is not None:
                runs.append(("draft", 0, self.drafter.module, *inputs(1)))
            times: dict[tuple[str, int], list[float]] = {(kind, gamma): [] for kind, gamma, *_ in runs}
            for i in range(repeats + 1):  # interleaved; the first round warms up
                for kind, gamma, model, tokens, positions in runs:
                    start = clock(device)
                    self.runner(model, tokens, positions, context + tokens.shape[1], cache)
                    if i:
                        times[kind, gamma].append(clock(device) - start)
            for (kind, gamma), values in times.items():
                measurements.append({"kind": kind, "batch": batch, "total_context": batch * context,
                                     "gamma": gamma, "seconds": statistics.median(values)})
        return measurements

    def _finish_reason(self, tokens: list[int], max_new_tokens: int, start: int) -> str | None:
        """Truncate ``tokens`` in place at the first EOS or the budget; say why it finished.

        Only ``tokens[start:]`` are new since the last check (earlier ones held no EOS)."""
        for i in range(start, min(len(tokens), max_new_tokens)):
            if tokens[i] in self.eos_token_ids:
                del tokens[i + 1 :]
                return "stop"
        if len(tokens) >= max_new_tokens:
            del tokens[max_new_tokens:]
            return "length"
        return None

    def _prefill(self, requests: list[Request], cache: KVCache) -> torch.Tensor:  # [n, vocab]
        """Prefill each distinct prompt once; its samples' slots get a copy of its KV."""
        device = self.engine_config.device
        groups: dict[tuple[int, ...], list[int]] = {}
        for row, request in enumerate(requests):
            groups.setdefault(request.prompt_ids, []).append(row)
        prompts = list(groups)
        logits = torch.empty(len(requests), self.target.args.vocab_size, device=device)
        for start in range(0, len(prompts), _PREFILL_CHUNK):
            chunk = prompts[start : start + _PREFILL_CHUNK]
            width = max(len(p) for p in chunk)
            tokens = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
            for i, prompt in enumerate(chunk):
                tokens[i, : len(prompt)] = torch.tensor(prompt)
            positions = torch.arange(width, device=device).expand(len(chunk), width)
            first_slots = torch.tensor([groups[p][0] for p in chunk], device=device)
            last_index = torch.tensor([len(p) - 1 for p in chunk], device=device)
            chunk_logits = self.target(tokens, positions, cache, first_slots, output_index=last_index)[:, 0]
            for i, prompt in enumerate(chunk):
                rows = groups[prompt]
                logits[rows] = chunk_logits[i]
                if len(rows) > 1:  # samples of one prompt share its prefix: copy, do not recompute
                    cache.k[:, rows[1:], :, : len(prompt)] = cache.k[:, rows[:1], :, : len(prompt)]
                    cache.v[:, rows[1:], :, : len(prompt)] = cache.v[:, rows[:1], :, : len(prompt)]
        return logits

    def _plain_step(self, cache, lengths, longest, last, params, generator, marks):
        """One target forward for the last token of each row (rows in the cache's first slots), one
        draw each. Returns what ``_speculative_step`` returns: ``(tokens [batch, 1], accepted [batch]
        (zeros), target logits [batch, 1, vocab], None)``."""
        marks.mark()
        target_logits = self.runner(self.target, last[:, None], lengths[:, None], longest + 1, cache)
        new_tokens = sample(logits_to_probs(target_logits[:, 0], *params), generator)[:, None]
        return new_tokens, torch.zeros_like(lengths), target_logits, None

    def _speculative_step(self, cache, lengths, longest, last, num_draft, gamma, params, generator, marks):
        """Draft ``gamma`` tokens on the shared cache (rows in its first slots), verify them in one
        target forward, accept. Returns ``(output tokens [batch, gamma + 1], accepted [batch],
        target logits [batch, gamma + 1, vocab], whether every draft logit was finite [])``; no
        host synchronisation (the caller reads the results once)."""
        marks.mark()
        token, draft_tokens, draft_probs = last, [], []
        finite = torch.ones((), dtype=torch.bool, device=last.device)
        for i in range(gamma):
            logits = self.runner(self.drafter.module, token[:, None], (lengths + i)[:, None], longest + i + 1,
                                 cache)[:, 0]  # [batch, vocab]
            finite &= torch.isfinite(logits).all()  # KV writes past the committed length: harmless if not
            probs = logits_to_probs(logits, *params)  # [batch, vocab]
            token = sample(probs, generator)
            draft_tokens.append(token)
            draft_probs.append(probs)
        draft_tokens = torch.stack(draft_tokens, dim=1)  # [batch, gamma]
        marks.mark()
        positions = lengths[:, None] + torch.arange(gamma + 1, device=lengths.device)
        target_logits = self.runner(self.target, torch.cat([last[:, None], draft_tokens], dim=1), positions,
                                    longest + gamma + 1, cache)
        target_probs = logits_to_probs(*_verifier_inputs(target_logits, params))  # [batch, gamma + 1, vocab]
        greedy = params[0] == 0
        output, num_accepted = rejection_sample(
            draft_tokens, num_draft, torch.stack(draft_probs, dim=1), target_probs, generator, greedy
        )
        return output, num_accepted, target_logits, finite


def _verifier_inputs(target_logits: torch.Tensor, params: tuple) -> tuple:  # target_logits: [batch, tokens, vocab]
    """The verifier's ``logits_to_probs`` arguments: the drafter's sampling parameters, unless a test injects
    a bug that breaks that (``_mutations``)."""
    bug = injected_bug()
    temperature, top_k, top_p = params[:3]
    if bug == "temperature-twice":
        target_logits = target_logits / torch.where(temperature > 0, temperature, 1.0)[:, None, None]
    elif bug == "top-p-draft-only":
        top_p = torch.ones_like(top_p)
    return (target_logits, temperature, top_k, top_p, *params[3:])


def _read_step(
    num_accepted: torch.Tensor,  # [batch] int64
    new_tokens: torch.Tensor,  # [batch, tokens] int64
    finite: torch.Tensor | None,  # [] bool: every draft logit was finite (None: no drafts)
    target_logits: torch.Tensor,  # [batch, tokens, vocab]
    logprobs_of: Callable | None,  # (logits, tokens) -> [batch, tokens] log-probs, when requests want them
) -> tuple[list[int], list[list[int]], list[list[float]], bool]:
    """The decode step's one read of the device: accepted counts, tokens, the drafter's health and
    (when asked) the tokens' log-probs, packed into one float64 tensor (token ids are exact there)."""
    batch, width = new_tokens.shape
    packed = [num_accepted[:, None].double(), new_tokens.double()]
    if finite is not None:
        packed.append(finite.double().expand(batch, 1))
    if logprobs_of is not None:
        packed.append(logprobs_of(target_logits, new_tokens).double())
    host = torch.cat(packed, dim=1).tolist()  # [batch, 1 + tokens (+ 1) (+ tokens)]
    healthy = finite is None or bool(host[0][1 + width])
    logprobs_at = 1 + width + (finite is not None)
    return ([int(h[0]) for h in host], [[int(t) for t in h[1: 1 + width]] for h in host],
            [h[logprobs_at:] for h in host] if logprobs_of is not None else [[]] * batch, healthy)


class _Marks:
    """Time points inside a decode step without a host synchronisation: CUDA events on a GPU (read
    after the step's one device read), ``perf_counter`` on a CPU (where every op is synchronous)."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.points: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append(event)
        else:
            self.points.append(time.perf_counter())

    def seconds(self, start: int, end: int) -> float:
        if self.cuda:
            return self.points[start].elapsed_time(self.points[end]) / 1e3
        return self.points[end] - self.points[start]


def _compact(cache: KVCache, slot_rows: list[int], keep: list[int], lengths: list[int]) -> None:
    """Move the KV of the rows in ``keep`` (a subsequence of ``slot_rows``, which lists the row in
    each slot) down to slots ``0 .. len(keep) - 1``, in order: the active rows fill the first
    slots. Copies only each moved row's committed positions; a row's target slot is never above its
    source, so the moves in slot order never overwrite a row not yet moved."""
    slot_of = {row: slot for slot, row in enumerate(slot_rows)}
    for slot, row in enumerate(keep):
        source = slot_of[row]
        if source != slot:
            cache.k[:, slot, :, : lengths[row]] = cache.k[:, source, :, : lengths[row]]
            cache.v[:, slot, :, : lengths[row]] = cache.v[:, source, :, : lengths[row]]


def clock(device: torch.device | str) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` is done (CUDA kernels run
    asynchronously: without the synchronize a step's time would be its launch time)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


_DTYPE_PROBE_CONTEXT = 256  # KV positions per row while timing dtype candidates
_DTYPE_PROBE_BATCHES = (1, 16)
_DTYPE_CHOICES: dict[tuple, dict] = {}  # (model args, device, drafter, threads) -> choose_dtype's answer


def choose_dtype(hf_model, config: EfficientRolloutConfig, engine_config: NativeEngineConfig,
                 repeats: int = 5) -> dict:
    """``dtype='auto'``: bfloat16 on CUDA; on a CPU the faster of float32 and bfloat16, measured.

    Each candidate builds the lean decoder and its drafter, then times a target step and a drafter
    step (median of ``repeats``, after warm-up) at 1 and 16 rows with 256 positions of KV; the
    dtype with the smaller sum wins. Returns ``{"dtype", "reason", "timings": {dtype: {step:
    seconds}}}``: the choice and its evidence, for the log and the bench report."""
    device = engine_config.device
    if torch.device(device).type == "cuda":
        return {"dtype": "bfloat16", "reason": "CUDA: bfloat16 (tensor cores, half the bytes of float32)",
                "timings": {}}
    # One measurement per process and model shape: engines of one process agree (same outputs).
    key = (ModelArgs.from_hf_config(hf_model.config), device, config.drafter.name, torch.get_num_threads(),
           engine_config.pack_cpu_linears, engine_config.cpu_decode_ops)
    if key in _DTYPE_CHOICES:
        return _DTYPE_CHOICES[key]
    timings: dict[str, dict[str, float]] = {}
    for name in ("float32", "bfloat16"):
        model = DecoderLM.from_hf(hf_model, dtype=torch_dtype(name), device=device,
                                  pack_cpu_linears=engine_config.pack_cpu_linears,
                                  cpu_decode_ops=engine_config.cpu_decode_ops)
        try:
            drafter = build_drafter(model, config.drafter).module
        except Exception:  # no drafter on this candidate: time the target alone (the engine warns later)
            drafter = None
        timings[name] = {}
        with torch.inference_mode():
            for batch in _DTYPE_PROBE_BATCHES:
                cache = KVCache(model.args, batch, _DTYPE_PROBE_CONTEXT + 1, model.dtype, device)
                tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
                positions = torch.full((batch, 1), _DTYPE_PROBE_CONTEXT, device=device)
                for kind, module in (("target", model), ("draft", drafter)):
                    if module is None:
                        continue
                    seconds = []
                    for i in range(repeats + 2):  # two warm-ups
                        start = clock(device)
                        module(tokens, positions, cache, slice(0, batch), keys=_DTYPE_PROBE_CONTEXT + 1)
                        if i >= 2:
                            seconds.append(clock(device) - start)
                    timings[name][f"{kind}@{batch}"] = statistics.median(seconds)
        del model, drafter
    common = set(timings["float32"]) & set(timings["bfloat16"])
    total = {name: sum(t[k] for k in common) for name, t in timings.items()}
    chosen = min(total, key=total.get)
    detail = ", ".join(f"{name} {1e3 * total[name]:.1f} ms" for name in total)
    choice = _DTYPE_CHOICES[key] = {
        "dtype": chosen, "timings": timings,
        "reason": f"measured on {torch.backends.cpu.get_cpu_capability()}: sum of target and drafter steps at 1 "
                  f"and 16 rows {detail}"}
    return choice


def resolve_device(config: NativeEngineConfig) -> NativeEngineConfig:
    """``device='auto'`` becomes ``cuda`` when torch sees a GPU, else ``cpu``."""
    if config.device != "auto":
        return config
    return replace(config, device="cuda" if torch.cuda.is_available() else "cpu")
