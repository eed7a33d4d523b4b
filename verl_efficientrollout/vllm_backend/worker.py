"""Worker extension (vLLM's ``worker_extension_cls``): methods mixed into each vLLM worker,
called with ``LLM.collective_rpc``. They serve both drafter routes: the self-drafter (our
proposer, ``selfspec``) and vLLM's ``draft_model`` method (the comparison route)."""

from __future__ import annotations

import contextlib
import time

_PROFILER_ATTR = "_efficient_profiler"


def function_key(path: str, line: int, name: str) -> str:
    """``cProfile``'s function key as a path below site-packages (or this package), ``:line(name)``;
    builtins by name."""
    for marker in ("site-packages/", "verl_efficientrollout/"):
        if marker in path:
            path = (marker if marker != "site-packages/" else "") + path.split(marker, 1)[1]
            break
    return f"{path}:{line}({name})" if line else name


def _self_drafter(worker):
    """Our ``SelfSpecProposer`` when this worker drafts with the self-drafter, else None."""
    drafter = getattr(worker.model_runner, "drafter", None)
    return drafter if type(drafter).__name__ == "SelfSpecProposer" else None


def rebuilding(own):
    """The context a weight update runs in: the self-drafter ``own`` rebuilt from what the target
    loads (``SelfSpecProposer.rebuilding_from_target``, yielding its report), or, without one, a
    null context yielding None."""
    return own.rebuilding_from_target() if own is not None else contextlib.nullcontext(None)


class EfficientWorkerExtension:
    def efficient_load_weights(self, path: str, update_drafter: bool = True) -> dict:
        """Load HF-named tensors (a safetensors file: the standalone ``VLLMEngine``'s route; under
        verl the tensors come through verl's sync, ``verl_worker``) into the target in place
        (vLLM's layerwise reload keeps the target's parameter objects, which the self-drafter
        shares), rebuilding the drafter on the way: the self-drafter re-quantizes each decoder
        linear from what the target loaded (``rebuilding_from_target``, all or nothing, the same
        path as verl's sync); the draft_model route reloads its draft model through the layerwise
        reload, which re-runs its online int4 quantization. ``update_drafter=False`` leaves it stale."""
        from safetensors.torch import load_file

        from verl_efficientrollout.vllm_backend.compat import draft_model, reload_drafter

        weights = list(load_file(path).items())
        own = _self_drafter(self) if update_drafter else None
        start = time.perf_counter()
        with rebuilding(own) as report:
            self.model_runner.reload_weights(weights_iterator=iter(weights))
        target_seconds = time.perf_counter() - start
        drafter_seconds, drafter_error = None, None
        if own is not None:
            drafter_seconds, drafter_error = report.get("build_seconds"), report["error"]
        elif update_drafter and (drafter := draft_model(self.model_runner)) is not None:
            start = time.perf_counter()
            try:
                reload_drafter(drafter, self.vllm_config.speculative_config.draft_model_config, weights)
            except Exception as exc:  # reported to the engine, which warns; the target is already updated
                drafter_error = f"{type(exc).__name__}: {exc}"
            drafter_seconds = time.perf_counter() - start
        return {"target_seconds": target_seconds, "drafter_seconds": drafter_seconds, "drafter_error": drafter_error}

    def efficient_drafter_status(self) -> dict:
        """The drafter of this worker: route (``self`` / ``draft-model`` / None), and for the
        self-drafter its build report (recipe, bytes), whether it is off and why, and its counts."""
        own = _self_drafter(self)
        if own is not None:
            return own.status()
        from verl_efficientrollout.drafter import tensor_bytes
        from verl_efficientrollout.vllm_backend.compat import draft_model

        drafter = draft_model(self.model_runner)
        if drafter is None:
            return {"route": None}
        return {"route": "draft-model", "drafter_bytes": sum(tensor_bytes(p) for p in drafter.parameters())}

    def efficient_count_drafter_forwards(self) -> dict:
        """Forwards and tokens the drafter has run since the first call (the draft_model route:
        counted by a hook installed at the first call; the self-drafter counts its own)."""
        from verl_efficientrollout.vllm_backend.compat import draft_model

        own = _self_drafter(self)
        if own is not None:
            return {"forwards": own.counts["forwards"], "tokens": own.counts["tokens"]}
        drafter = draft_model(self.model_runner)
        if drafter is None:
            return {"forwards": 0, "tokens": 0}
        counts = getattr(self, "_efficient_drafter_counts", None)
        if counts is None:
            counts = self._efficient_drafter_counts = {"forwards": 0, "tokens": 0}

            def count(module, args, kwargs):
                ids = kwargs.get("input_ids", args[0] if args else None)
                counts["forwards"] += 1
                counts["tokens"] += int(ids.numel()) if ids is not None else 0

            drafter.register_forward_pre_hook(count, with_kwargs=True)
        return dict(counts)

    def efficient_shared_tensors(self) -> dict:
        """How the self-drafter holds each of its tensors: the storage address of a tensor it shares
        with the target (the target's own tensor), or the type of one it owns (a quantized decoder
        linear's weight); how many KV tensors vLLM allocated; whether each model ties its head."""
        own = _self_drafter(self)
        if own is None or own.model is None:
            return {}
        target = self.model_runner.get_model()
        target_ids = {id(t) for t in [*target.parameters(), *target.buffers()]}
        shared, owned = {}, {}
        for name, tensor in own.model.named_parameters(remove_duplicate=False):
            if id(tensor) in target_ids:
                shared[name] = tensor.untyped_storage().data_ptr()
            else:
                owned[name] = type(tensor.data).__name__ if type(tensor).__name__ == "Parameter" else type(tensor).__name__
        return {"shared": shared, "owned": owned, "kv_tensors": len(self.model_runner.kv_caches),
                "lm_head_is_embedding": own.model.lm_head.weight is own.model.model.embed_tokens.weight,
                "target_lm_head_is_embedding": target.lm_head.weight is target.model.embed_tokens.weight}

    def efficient_profile_calls(self, start: bool) -> dict | None:
        """Diagnosis (``examples/vllm_k0_profile.py``, the K = 0 test): ``True`` starts ``cProfile`` on
        the thread that serves this RPC, the one that runs this worker's model runner (with vLLM's
        multiprocess executor the scheduler runs in another process, unseen; with the in-process one it
        is seen too); ``False`` stops it and returns ``{function: [calls, own s, cumulative s]}``
        (``function_key``) of what ran in between."""
        import cProfile
        import pstats

        profiler = getattr(self, _PROFILER_ATTR, None)
        if start:
            if profiler is not None:
                profiler.disable()
            profiler = cProfile.Profile()
            setattr(self, _PROFILER_ATTR, profiler)
            profiler.enable()
            return None
        if profiler is None:
            raise RuntimeError("efficient_profile_calls(False) without a running profile: call it with True first")
        profiler.disable()
        setattr(self, _PROFILER_ATTR, None)
        return {function_key(*func): [calls, own, cum]
                for func, (_, calls, own, cum, _) in pstats.Stats(profiler).stats.items()}

    def efficient_inject_bug(self, bug: str) -> str:
        """Tests only: make this worker's speculative steps commit one of ``_mutations.BUGS`` ("" for none);
        returns the bug now injected."""
        import os

        from verl_efficientrollout._mutations import BUGS, ENV, injected_bug

        if bug and bug not in BUGS:
            raise ValueError(f"efficient_inject_bug: bug must be one of {', '.join(BUGS)} (or ''), got {bug!r}")
        if bug:
            os.environ[ENV] = bug
        else:
            os.environ.pop(ENV, None)
        return injected_bug()

    def efficient_describe(self) -> dict:
        """Type of one decoder linear's weight in the target and in the drafter (int4 check)."""
        def weight_type(model):
            if model is None:
                return None
            for name, param in model.named_parameters():
                if name.endswith("down_proj.weight"):
                    return type(param.data).__name__ if type(param).__name__ == "Parameter" else type(param).__name__
            return None

        from verl_efficientrollout.vllm_backend.compat import draft_model

        return {"target": weight_type(self.model_runner.get_model()),
                "drafter": weight_type(draft_model(self.model_runner))}
