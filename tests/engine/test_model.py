"""The lean decoder's CPU linears: oneDNN pre-packed weights, padded to a few row counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from verl_efficientrollout.engine.model import DecoderLM, Linear, onednn_linear_ops, packed_rows


def test_packed_rows_are_few_buckets_that_cover_every_row_count():
    buckets = {packed_rows(rows) for rows in range(1, 65)}
    assert buckets == {1, 2, 4, 8, 16, 32, 48, 64}
    assert all(packed_rows(rows) >= rows for rows in range(1, 200))


@pytest.mark.skipif(onednn_linear_ops() is None, reason="this torch has no oneDNN linear ops")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_linear_computes_what_f_linear_does_for_any_row_count(dtype):
    generator = torch.Generator().manual_seed(0)
    linear = Linear(96, 40, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 96, generator=generator))
        linear.bias.copy_(torch.randn(40, generator=generator))
    linear = linear.to(dtype)
    if not linear.pack():  # no oneDNN kernel for this dtype here (bf16 on an AVX2-only CPU): aten serves
        assert linear._packed is None
    tolerance = {"rtol": 1e-4, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-1}
    for shape in [(1, 96), (3, 1, 96), (5, 7, 96), (70, 96), (2, 0, 96)]:
        x = torch.randn(shape, generator=generator).to(dtype)
        torch.testing.assert_close(linear(x), F.linear(x, linear.weight, linear.bias), **tolerance)


@pytest.mark.skipif(onednn_linear_ops() is None, reason="this torch has no oneDNN linear ops")
def test_a_replaced_weight_never_runs_from_the_stale_packed_copy(small_model):
    model = DecoderLM.from_hf(small_model, dtype=torch.float32, device="cpu", pack_cpu_linears=True)
    assert model.packed_linears == 2 * 4 + 1  # four per block and the lm_head
    block = model.layers[0]
    x = torch.randn(2, 3, small_model.config.hidden_size)
    block.w13.weight = torch.nn.Parameter(torch.zeros_like(block.w13.weight), requires_grad=False)
    assert model.packed_linears == 2 * 4  # that one runs F.linear on its new weight now
    assert torch.equal(block.w13(x), torch.zeros(2, 3, block.w13.out_features))
    model.load_hf_state_dict(small_model.state_dict(), dtype=torch.float32, device="cpu")  # an update re-packs
    assert model.packed_linears == 2 * 4 + 1
