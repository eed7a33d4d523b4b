"""The ``sglang.srt.plugins`` entry point: SGLang calls ``register()`` in every process it starts.

It registers one quantization method per self-drafter recipe (``efficient_int4_g32``, ...,
``efficient_int8``) for ``speculative_draft_model_quantization``: SGLang's STANDALONE draft model
is the target's own checkpoint, and our method turns its decoder linears into the int4 (or int8)
weight-only copy, with the same torchao recipe as the native engine's drafter (embeddings and
lm_head stay bf16; SGLang's draft model keeps its own copy of them). SGLang fans each weight update
out to the draft model first and then the target; a hook around the model runner's
``update_weights_from_tensor`` turns our quantized linears back into dense parameters, lets SGLang
load the new tensors, and re-quantizes them: the drafter is rebuilt from the new weights at every
sync. Each quantization is reported as a JSON line in the file named by
``VERL_EFFICIENTROLLOUT_SGLANG_REPORT`` (``SGLangEngine`` reads it). Idempotent; never raises into SGLang.
"""

from __future__ import annotations

import json
import logging
import os
import time

logger = logging.getLogger(__name__)

REPORT_ENV = "VERL_EFFICIENTROLLOUT_SGLANG_REPORT"
_registered = False


def register() -> None:
    """SGLang calls this in every process of every user who has this package installed, so it
    never raises: an unsupported SGLang leaves the plugin inactive, with a warning."""
    try:
        _register()
    except Exception as exc:  # noqa: BLE001 - must not break SGLang for users who do not use us
        logger.warning("verl-efficientrollout's SGLang plugin is inactive (the efficient_* drafter quantization "
                       "methods are not registered): %s", exc)


def _register() -> None:
    global _registered
    if _registered:
        return
    from verl_efficientrollout.config import DrafterConfig
    from verl_efficientrollout.sglang_backend import compat

    methods, base_methods, add_choices, config_base, dense_method, linear_base = compat.quantization_api()
    recipes = DrafterConfig.every_recipe()
    for recipe in recipes:
        cls = _quantization_class(recipe, config_base, dense_method, linear_base)
        methods[recipe.method_name] = base_methods[recipe.method_name] = cls
    add_choices([r.method_name for r in recipes])
    registry, kind = compat.hook_registry()
    registry.register(compat.MODEL_RUNNER_UPDATE, _requantize_around_update, kind.AROUND)
    compat.register_fixes()
    _registered = True


def report(record: dict) -> None:
    """Append one record to the engine's report file (when an engine of ours asked for one)."""
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({**record, "pid": os.getpid()}) + "\n")


def quantize_linear(layer, recipe) -> tuple[bool, float]:
    """Replace ``layer.weight`` (an SGLang linear's dense parameter) by its int4/int8 weight-only
    torchao tensor, keeping SGLang's loader attributes to restore it for the next update.
    Returns (quantized?, the dense weights' sum: a fingerprint of what was quantized); not
    quantized (left dense) when the group size does not divide its input width."""
    import torch
    from torchao.quantization import quantize_

    from verl_efficientrollout.drafter import torchao_config

    weight = layer.weight
    layer._efficient_recipe = recipe
    layer._efficient_weight_attrs = dict(weight.__dict__)
    layer._efficient_dense = (tuple(weight.shape), weight.dtype, weight.device)
    fingerprint = float(torch.sum(weight.detach(), dtype=torch.float64))  # accumulates in float64, no copy
    if recipe.recipe == "int4" and weight.shape[1] % recipe.group_size:
        return False, fingerprint
    backend = "cuda" if weight.is_cuda else "cpu"
    if backend == "cuda" and weight.dtype != torch.bfloat16:
        return False, fingerprint  # the CUDA int4 kernel (tinygemm) takes bf16 only
    quantize_(layer, torchao_config(recipe, backend), filter_fn=lambda module, fqn: module is layer)
    return True, fingerprint


def restore_dense(layer) -> None:
    """Undo ``quantize_linear`` before a weight update: a dense parameter again, with SGLang's
    loader attributes, for the update to fill (our engine always sends every tensor, so the old
    values are not needed: the int4 kernels' tensors cannot dequantize on every device)."""
    import torch

    weight = layer.weight
    if type(weight) is torch.nn.Parameter and type(weight.data) is torch.Tensor:
        return  # left dense
    shape, dtype, device = layer._efficient_dense
    parameter = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False)
    parameter.__dict__.update(layer._efficient_weight_attrs)
    layer.weight = parameter


def _requantize_around_update(original, runner, named_tensors, *args, **kwargs):
    """Around ``ModelRunner.update_weights_from_tensor`` (each runner: the draft model's, then the
    target's): for a model with our quantized linears, load the new tensors into dense weights,
    then quantize them again. A failed re-quantization leaves that linear dense (still the new
    weights: drafting stays lossless), reported to the engine, which warns."""
    layers = [m for m in runner.model.modules() if hasattr(m, "_efficient_recipe")]
    if not layers:
        return original(runner, named_tensors, *args, **kwargs)
    for layer in layers:
        restore_dense(layer)
    try:
        return original(runner, named_tensors, *args, **kwargs)
    finally:
        start, error, quantized, fingerprint = time.perf_counter(), None, 0, 0.0
        try:
            for layer in layers:
                done, total = quantize_linear(layer, layer._efficient_recipe)
                quantized, fingerprint = quantized + done, fingerprint + total
        except Exception as exc:  # noqa: BLE001 - reported, never raised into SGLang's scheduler
            error = f"{type(exc).__name__}: {exc}"
        report({"event": "requantized", "linears": quantized, "of": len(layers), "fingerprint": fingerprint,
                "seconds": time.perf_counter() - start, "error": error})


def _quantization_class(recipe, config_base, dense_method, linear_base):
    """An SGLang ``QuantizationConfig`` that needs no config file: every linear of the model it is
    given to (the draft model) gets ``quantize_linear`` after its weights are loaded."""
    name = recipe.method_name

    class EfficientDrafterLinearMethod(dense_method):
        def process_weights_after_loading(self, layer) -> None:
            super().process_weights_after_loading(layer)
            start = time.perf_counter()
            try:
                done, fingerprint = quantize_linear(layer, recipe)
            except Exception as exc:  # noqa: BLE001 - the linear stays dense; the engine warns
                report({"event": "quantized", "linears": 0, "of": 1, "fingerprint": 0.0, "seconds": 0.0,
                        "error": f"{type(exc).__name__}: {exc}"})
            else:
                report({"event": "quantized", "linears": int(done), "of": 1, "fingerprint": fingerprint,
                        "seconds": time.perf_counter() - start, "error": None})

    class EfficientDrafterQuantization(config_base):
        def get_name(self) -> str:
            return name

        def get_supported_act_dtypes(self):
            import torch

            return [torch.bfloat16, torch.float16, torch.float32]

        @classmethod
        def get_min_capability(cls) -> int:
            return 0

        @staticmethod
        def get_config_filenames() -> list[str]:
            return []  # online: quantized from the dense checkpoint

        @classmethod
        def from_config(cls, config) -> "EfficientDrafterQuantization":
            return cls()

        def get_quant_method(self, layer, prefix: str):
            return EfficientDrafterLinearMethod() if isinstance(layer, linear_base) else None

        def get_scaled_act_names(self) -> list[str]:
            return []

    EfficientDrafterQuantization.__name__ = EfficientDrafterQuantization.__qualname__ = f"Quantization_{name}"
    return EfficientDrafterQuantization
