"""The vLLM compatibility layer's pure parts (run in every tier, vLLM or not)."""

from __future__ import annotations

import pytest
import torch

from verl_efficientrollout.vllm_backend.compat import expand_batch_to_tokens_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_expand_writes_each_requests_value_over_its_tokens_in_place(dtype):
    values = torch.tensor([1.0, 0.7, 1.3]).to(dtype) if dtype.is_floating_point else torch.tensor([5, 0, 9], dtype=dtype)
    cu_num_tokens = torch.tensor([2, 5, 6], dtype=torch.int32)
    output = torch.full((6,), -1, dtype=dtype)
    expand_batch_to_tokens_reference(output, values, cu_num_tokens, replace_from=0, replace_to=7)
    expected = [values[0]] * 2 + [values[1] if values[1] != 0 else 7] * 3 + [values[2]]
    assert output.tolist() == torch.tensor(expected, dtype=dtype).tolist()


def test_expand_handles_requests_without_tokens():
    output = torch.zeros(3)
    expand_batch_to_tokens_reference(output, torch.tensor([2.0, 3.0, 4.0]), torch.tensor([1, 1, 3]), 0, 0)
    assert output.tolist() == [2.0, 4.0, 4.0]


def test_the_vllm_plugin_never_raises_into_vllm(monkeypatch, caplog):
    """vLLM calls general plugins for every user: a failure must leave vLLM working."""
    from verl_efficientrollout.vllm_backend import compat, plugin

    def unsupported():
        raise RuntimeError("vLLM 0.99.0 is not supported")

    monkeypatch.setattr(compat, "torchao_quantization_base", unsupported)
    monkeypatch.setattr(plugin, "_registered", False)
    plugin.register()
    assert "inactive" in caplog.text and "0.99.0" in caplog.text
