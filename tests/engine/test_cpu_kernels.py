"""The compiled CPU decode ops: the same computation as the model's PyTorch path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from verl_efficientrollout.engine.cpu_kernels import decode_ops
from verl_efficientrollout.engine.model import MAX_DECODE_OPS_QUERY_ROWS, DecoderLM, KVCache

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "c++") is None, reason="no C++ compiler here")


def _models(small_model):
    assert decode_ops() is not None, "a compiler is here: the ops must build"
    kernel = DecoderLM.from_hf(small_model, dtype=torch.float32, device="cpu", cpu_decode_ops=True)
    eager = DecoderLM.from_hf(small_model, dtype=torch.float32, device="cpu", cpu_decode_ops=False)
    assert kernel.decode_ops is not None and eager.decode_ops is None
    return kernel, eager


def _random_caches(model, slots: int, max_len: int, seed: int) -> tuple[KVCache, KVCache]:
    generator = torch.Generator().manual_seed(seed)
    first, second = (KVCache(model.args, slots, max_len, torch.float32) for _ in range(2))
    first.k.normal_(generator=generator)
    first.v.normal_(generator=generator)
    second.k.copy_(first.k)
    second.v.copy_(first.v)
    return first, second


@needs_compiler
def test_a_one_token_step_matches_the_pytorch_path_in_logits_and_in_the_kv_it_writes(small_model):
    kernel, eager = _models(small_model)
    kernel_cache, eager_cache = _random_caches(kernel, slots=8, max_len=48, seed=1)
    positions = torch.tensor([[3], [17], [0], [46], [9]])  # [batch, 1]: rows at different lengths
    tokens = torch.randint(0, kernel.args.vocab_size, (5, 1), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        kernel_logits = kernel(tokens, positions, kernel_cache, slice(0, 5))
        eager_logits = eager(tokens, positions, eager_cache, slice(0, 5))
    torch.testing.assert_close(kernel_logits, eager_logits, rtol=1e-5, atol=1e-5)
    # The new K and V differ by rounding only (the norm sums in another order); nothing else is written.
    torch.testing.assert_close(kernel_cache.k, eager_cache.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernel_cache.v, eager_cache.v, rtol=1e-5, atol=1e-5)
    # Slots past the batch are untouched.
    assert torch.equal(kernel_cache.k[:, 5:], eager_cache.k[:, 5:])


@needs_compiler
def test_keys_past_a_rows_position_are_never_read(small_model):
    kernel, _ = _models(small_model)
    clean, dirty = _random_caches(kernel, slots=3, max_len=32, seed=3)
    positions = torch.tensor([[5], [12], [30]])
    for row, position in enumerate(positions[:, 0].tolist()):
        dirty.k[:, row, :, position + 1 :] = 1e4  # stale keys of rejected drafts, huge
        dirty.v[:, row, :, position + 1 :] = -1e4
    tokens = torch.tensor([[1], [2], [3]])
    with torch.inference_mode():
        assert torch.equal(kernel(tokens, positions, clean, slice(0, 3)), kernel(tokens, positions, dirty, slice(0, 3)))


@needs_compiler
def test_a_verify_of_several_tokens_computes_what_one_token_steps_would(small_model):
    kernel, eager = _models(small_model)
    verify_cache, steps_cache = _random_caches(kernel, slots=3, max_len=40, seed=6)
    eager_cache, _ = _random_caches(kernel, slots=3, max_len=40, seed=6)
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])  # [batch, gamma + 1]
    positions = torch.tensor([[4], [20], [33]]) + torch.arange(4)  # rows at different lengths
    with torch.inference_mode():
        verify = kernel(tokens, positions, verify_cache, slice(0, 3))  # [batch, 4, vocab]
        steps = torch.cat([kernel(tokens[:, t : t + 1], positions[:, t : t + 1], steps_cache, slice(0, 3))
                           for t in range(4)], dim=1)
        torch.testing.assert_close(verify, eager(tokens, positions, eager_cache, slice(0, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(verify, steps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(verify_cache.k, steps_cache.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(verify_cache.v, eager_cache.v, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_prefill_large_verifies_and_gathered_slots_take_the_pytorch_path(small_model):
    kernel, eager = _models(small_model)
    kernel_cache, eager_cache = _random_caches(kernel, slots=6, max_len=64, seed=4)
    long = MAX_DECODE_OPS_QUERY_ROWS + 1
    cases = [(torch.arange(long)[None] % 32, torch.arange(long)[None], slice(0, 1)),  # a prefill-long step
             (torch.ones(6, 3, dtype=torch.long), torch.arange(3).expand(6, 3) + 7, slice(0, 6)),  # 18 query rows
             (torch.tensor([[1, 2], [4, 5]]), torch.tensor([[4, 5], [10, 11]]), torch.tensor([3, 1]))]  # gathered
    with torch.inference_mode():
        for tokens, positions, slot_arg in cases:
            assert torch.equal(kernel(tokens, positions, kernel_cache, slot_arg), eager(tokens, positions, eager_cache, slot_arg))


@needs_compiler
def test_the_norm_and_silu_ops_compute_what_torch_does():
    ops = decode_ops()
    generator = torch.Generator().manual_seed(5)
    x, delta = torch.randn(2, 3, 200, generator=generator), torch.randn(2, 3, 200, generator=generator)
    weight = torch.randn(200, generator=generator)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5), F.rms_norm(x, (200,), weight, 1e-5))
    residual, normed = ops.add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(residual, x + delta)
    torch.testing.assert_close(normed, F.rms_norm(x + delta, (200,), weight, 1e-6))
    gate_up = torch.randn(3, 1, 2 * 130, generator=generator)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_mul(gate_up), F.silu(gate) * up)
    torch.testing.assert_close(ops.silu_mul(gate_up.transpose(0, 1).contiguous().transpose(0, 1)), F.silu(gate) * up)
    strided = torch.randn(2, 3, 400, generator=generator)[..., ::2]  # a non-contiguous input is read correctly
    torch.testing.assert_close(ops.rms_norm(strided, weight, 1e-5), F.rms_norm(strided, (200,), weight, 1e-5))
    with pytest.raises(RuntimeError, match="float32 CPU tensor"):
        ops.silu_mul(gate_up.double())


@needs_compiler
def test_the_op_rejects_a_position_outside_the_cache(small_model):
    kernel, _ = _models(small_model)
    cache = KVCache(kernel.args, 2, 16, torch.float32)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside the KV cache"):
        kernel(torch.tensor([[1], [2]]), torch.tensor([[3], [16]]), cache, slice(0, 2), keys=16)


def test_a_failed_build_warns_once_and_the_model_runs_its_pytorch_path(tmp_path):
    """A real failed build (no such compiler, empty kernel cache) in a fresh process."""
    script = textwrap.dedent("""
        import warnings, torch
        from transformers import LlamaConfig, LlamaForCausalLM
        from verl_efficientrollout.engine.model import MAX_DECODE_OPS_QUERY_ROWS, DecoderLM, KVCache
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        hf = LlamaForCausalLM(config).eval()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            models = [DecoderLM.from_hf(hf, dtype=torch.float32, device="cpu", cpu_decode_ops=True) for _ in range(2)]
        messages = [str(w.message) for w in caught if "CPU decode ops could not be built" in str(w.message)]
        assert len(messages) == 1 and "no C++ compiler" in messages[0], messages
        assert all(m.decode_ops is None for m in models)
        with torch.inference_mode():
            logits = models[0](torch.tensor([[1]]), torch.tensor([[0]]), KVCache(models[0].args, 1, 4, torch.float32), slice(0, 1))
        assert torch.isfinite(logits).all()
        print("fell back")
    """)
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "fell back" in result.stdout, result.stderr[-3000:]


def test_the_switch_takes_a_boolean_and_names_itself_otherwise():
    from verl_efficientrollout.config import NativeEngineConfig

    assert NativeEngineConfig().cpu_decode_ops is True
    with pytest.raises(ValueError, match="NativeEngineConfig.cpu_decode_ops must be true or false, got 'yes'"):
        NativeEngineConfig(cpu_decode_ops="yes")
