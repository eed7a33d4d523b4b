"""The compiled CPU decode ops: the same computation as the model's PyTorch path."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from verl_efficientrollout.engine.cpu_kernels import decode_ops, round_int16_blocks
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


class _Reference(torch.nn.Module):
    def __init__(self, int4) -> None:
        super().__init__()
        self.int4 = int4

    def forward(self, x):
        return self.int4.reference(x)


def _int4_linear(out_features: int, in_features: int, group: int, seed: int, bias: bool = False):
    from verl_efficientrollout.drafter import _native_int4_linear

    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) * 0.05)
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=generator))
    return linear, _native_int4_linear(linear, group)


@needs_compiler
@pytest.mark.parametrize(("group", "in_features"), [(32, 192), (64, 192), (32, 160)])  # 160: an odd block count
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 16, 21])
def test_the_int4_kernel_computes_its_dequantized_weight_times_its_activations_at_every_row_count(
        rows, group, in_features):
    # Every row-chunk path (16, 8, 4, 2, 1 and their mixes), an output count that leaves a tail (202),
    # both group sizes and both K layouts, against float64 products of the very weight and activations
    # the kernel multiplies (its PyTorch twin, Int4Linear.reference): float32 rounding only.
    assert decode_ops() is not None
    _, int4 = _int4_linear(out_features=202, in_features=in_features, group=group, seed=rows, bias=True)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(100 + rows))
    torch.testing.assert_close(int4(x).double(), int4.reference(x).double(), rtol=1e-5, atol=1e-5)
    # And the rounding is the only difference from the exact product: 2^-16 of a block's largest value.
    exact = x.double() @ int4.dequantize().double().T + int4.bias.double()
    torch.testing.assert_close(int4(x).double(), exact, rtol=1e-3, atol=1e-3)
    if rows < 8:  # the integer path on every build
        expected = round_int16_blocks(x).double() @ int4.dequantize().double().T + int4.bias.double()
        torch.testing.assert_close(int4(x).double(), expected, rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("rows", [1, 16])  # the integer path and the VNNI build's float32 chunks
def test_a_nan_activation_gives_nan_outputs_in_its_row_only(rows):
    # The engine detects a broken drafter by NaN logits; rounding must not turn a NaN into a number.
    _, int4 = _int4_linear(out_features=8, in_features=64, group=32, seed=13)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(14))
    x[0, 5] = float("nan")
    out = int4(x)
    assert out[0].isnan().all() and not out[1:].isnan().any()


def test_activations_round_to_int16_per_block_of_32():
    x = torch.tensor([[1.0, -0.5, 0.25] + [0.0] * 29 + [8.0] + [0.0] * 31])  # two blocks, scales 1 and 8 / 32767
    rounded = round_int16_blocks(x)
    assert rounded[0, 0] == 1.0 and rounded[0, 32] == 8.0  # each block's largest value is exact
    # round(32767 * v) / 32767, half to even: 16383.5 -> 16384, 8191.75 -> 8192
    torch.testing.assert_close(rounded[0, 1:3], torch.tensor([-16384 / 32767, 8192 / 32767]))
    assert torch.equal(round_int16_blocks(torch.zeros(1, 32)), torch.zeros(1, 32))


@needs_compiler
def test_the_int4_kernel_multiplies_by_torchaos_own_grid_of_the_weight():
    # The same integers, scales and zeros as torchao's CPU int4 route (PrototypeInt4WeightOnlyConfig):
    # its dequantized weight equals ours exactly, and its bfloat16-activation linear agrees with ours
    # (int16 activations per block of 32) to that rounding.
    from torchao.quantization import quantize_

    from verl_efficientrollout.config import DrafterConfig
    from verl_efficientrollout.drafter import torchao_config

    linear, int4 = _int4_linear(out_features=96, in_features=128, group=32, seed=7)
    ao = torch.nn.Linear(128, 96, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        ao.weight.copy_(linear.weight)
    quantize_(ao, torchao_config(DrafterConfig(group_size=32), "cpu"))
    identity = torch.eye(128, dtype=torch.bfloat16)
    ao_weight = ao(identity).float().T  # [96, 128]: exact, each output one dequantized weight in bfloat16
    torch.testing.assert_close(int4.dequantize().to(torch.bfloat16).float(), ao_weight, rtol=0, atol=0)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(int4(x), ao(x.to(torch.bfloat16)).float(), rtol=2e-2, atol=2e-2)


@needs_compiler
def test_the_int4_layout_round_trips_and_the_op_names_a_wrong_shape():
    from verl_efficientrollout.engine.cpu_kernels import pack_int4, unpack_int4

    values = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(9))
    packed = pack_int4(values)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), values.to(torch.uint8))
    assert packed[0, 0] == values[0, 0] | (values[0, 16] << 4)  # byte j of a block: q[j] and q[j + 16]
    _, int4 = _int4_linear(out_features=8, in_features=64, group=32, seed=10)
    with pytest.raises(RuntimeError, match="x's last dimension"):
        int4(torch.zeros(2, 32))
    assert decode_ops().int4_kernel_isa() in ("avx512-vnni", "avx2", "scalar")


@needs_compiler
def test_a_native_float32_targets_int4_drafter_runs_the_compiled_kernel_and_torchaos_on_request(small_model):
    from verl_efficientrollout.config import DrafterConfig
    from verl_efficientrollout.drafter import _shallow_clone, build_drafter
    from verl_efficientrollout.engine.cpu_kernels import Int4Linear

    target, _ = _models(small_model)
    native = build_drafter(target, DrafterConfig(group_size=32))
    torchao = build_drafter(target, DrafterConfig(group_size=32), kernel="torchao")
    assert native.report.kernel == f"native-int4-{decode_ops().int4_kernel_isa()}" and torchao.report.kernel == "torchao"
    assert all(isinstance(getattr(layer, name), Int4Linear) for layer in native.module.layers
               for name in ("wqkv", "wo", "w13", "w2"))
    assert native.module.lm_head.weight is target.lm_head.weight  # shared, as ever
    # Its logits are those of the target with each linear replaced by the kernel's PyTorch twin
    # (Int4Linear.reference: the dequantized weight times the int16-rounded activations): rounding only.
    reference = _shallow_clone(target)
    for layer, quantized in zip(reference.layers, native.module.layers):
        for name in ("wqkv", "wo", "w13", "w2"):
            setattr(layer, name, _Reference(getattr(quantized, name)))
    tokens = torch.randint(0, target.args.vocab_size, (3, 1), generator=torch.Generator().manual_seed(11))
    positions = torch.tensor([[4], [9], [0]])
    caches = _random_caches(target, slots=3, max_len=16, seed=12)
    with torch.inference_mode():
        got = native.module(tokens, positions, caches[0], slice(0, 3))
        want = reference(tokens, positions, caches[1], slice(0, 3))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="drafter kernel must be one of auto, native, torchao"):
        build_drafter(target, DrafterConfig(group_size=32), kernel="fast")


@needs_compiler
def test_a_bfloat16_target_keeps_torchaos_int4_kernel_unless_ours_is_asked_for(small_model):
    from verl_efficientrollout.config import DrafterConfig
    from verl_efficientrollout.drafter import build_drafter
    from verl_efficientrollout.engine.cpu_kernels import Int4Linear

    target = DecoderLM.from_hf(small_model, dtype=torch.bfloat16, device="cpu", cpu_decode_ops=True)
    assert target.decode_ops is None  # the float32 decode ops do not serve it
    assert build_drafter(target, DrafterConfig(group_size=32)).report.kernel == "torchao"
    forced = build_drafter(target, DrafterConfig(group_size=32), kernel="native")
    assert isinstance(forced.module.layers[0].w13, Int4Linear)
    tokens, positions = torch.tensor([[3]]), torch.tensor([[0]])
    with torch.inference_mode():
        logits = forced.module(tokens, positions, KVCache(target.args, 1, 4, torch.bfloat16), slice(0, 1))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@needs_compiler
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the AVX2 and scalar builds are x86's")
@pytest.mark.parametrize(("march", "isa"), [("x86-64-v3", "avx2"), ("x86-64", "scalar")])
def test_the_int4_kernels_avx2_and_scalar_builds_compute_what_its_pytorch_twin_does(tmp_path, march, isa):
    """-march=native builds this CPU's best path only: the others are built for an older ISA in a fresh
    process (an empty kernel cache) and checked the same way."""
    script = textwrap.dedent("""
        import torch
        from verl_efficientrollout.drafter import _native_int4_linear
        from verl_efficientrollout.engine.cpu_kernels import decode_ops
        assert decode_ops().int4_kernel_isa() == "%s", decode_ops().int4_kernel_isa()
        generator = torch.Generator().manual_seed(0)
        for group, k in ((32, 192), (64, 192), (32, 160)):
            linear = torch.nn.Linear(k, 45)
            with torch.no_grad():
                linear.weight.copy_(torch.randn(45, k, generator=generator) * 0.05)
            int4 = _native_int4_linear(linear, group)
            for rows in (1, 3, 16, 21):
                x = torch.randn(rows, k, generator=generator)
                torch.testing.assert_close(int4(x).double(), int4.reference(x).double(), rtol=1e-5, atol=1e-5)
        print("agrees")
    """ % isa)
    env = {**os.environ, "VERL_EFFICIENTROLLOUT_CPU_MARCH": march, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "agrees" in result.stdout, result.stderr[-3000:]
