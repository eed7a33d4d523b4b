"""Worker extension (vLLM's ``worker_extension_cls``): methods mixed into each vLLM worker,
called with ``LLM.collective_rpc``."""

from __future__ import annotations

import time


class EfficientWorkerExtension:
    def efficient_load_weights(self, path: str, update_drafter: bool = True) -> dict:
        """Load HF-named tensors (a safetensors file) into the target in place, then into the
        drafter through the layerwise reload, which re-runs its online int4 quantization."""
        from safetensors.torch import load_file

        from verl_efficientrollout.vllm_backend.compat import draft_model, reload_drafter

        weights = list(load_file(path).items())
        start = time.perf_counter()
        self.model_runner.reload_weights(weights_iterator=iter(weights))
        target_seconds = time.perf_counter() - start
        drafter_seconds, drafter_error = None, None
        drafter = draft_model(self.model_runner) if update_drafter else None
        if drafter is not None:
            start = time.perf_counter()
            try:
                reload_drafter(drafter, self.vllm_config.speculative_config.draft_model_config, weights)
            except Exception as exc:  # reported to the engine, which warns; the target is already updated
                drafter_error = f"{type(exc).__name__}: {exc}"
            drafter_seconds = time.perf_counter() - start
        return {"target_seconds": target_seconds, "drafter_seconds": drafter_seconds, "drafter_error": drafter_error}

    def efficient_count_drafter_forwards(self) -> dict:
        """Forwards and tokens the draft model has run since the first call (which installs the
        counting hook): what K = 0 still costs with vLLM's draft_model method."""
        from verl_efficientrollout.vllm_backend.compat import draft_model

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
