import pytest
import torch
from torch import nn

from verl_efficientrollout.config import DrafterConfig
from verl_efficientrollout.drafter import DrafterBuildError, build_drafter, torchao_config

INT4_G32 = DrafterConfig(recipe="int4", group_size=32)


def _is_quantized(tensor) -> bool:
    return type(tensor) not in (torch.Tensor, nn.Parameter)


def test_drafter_quantizes_decoder_linears_and_shares_everything_else(tiny_llama):
    drafter = build_drafter(tiny_llama, INT4_G32)
    report = drafter.report
    assert report.quantized_layers == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert report.skipped_layers == ("lm_head",)
    # On CPU an fp32 target's int4 linears run in bf16 inside a cast wrapper ("<name>.linear").
    draft_params = {
        name.replace(".linear.", "."): param
        for name, param in drafter.module.named_parameters(remove_duplicate=False)
    }
    for name, target_param in tiny_llama.named_parameters(remove_duplicate=False):
        draft_param = draft_params[name]
        if name.startswith("model.layers.") and "proj" in name:
            assert _is_quantized(draft_param), name
            assert not _is_quantized(target_param), name  # the target is left untouched
        else:  # embeddings, lm_head (tied) and norms: the target's own storage, no copy
            assert draft_param is target_param, name
    assert drafter.module.lm_head.weight is tiny_llama.model.embed_tokens.weight
    assert report.shared_bytes + report.drafter_bytes < report.target_bytes
    assert report.drafter_bytes < report.quantized_source_bytes / 4  # fp32 -> 4 bits + scales/zeros


@pytest.mark.parametrize("recipe", ["int4-g32", "int4-g64", "int8"])
def test_every_recipe_builds_a_drafter_close_to_the_target(tiny_llama, recipe):
    drafter = build_drafter(tiny_llama, DrafterConfig.from_name(recipe))
    ids = torch.randint(256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        target_logits = tiny_llama(ids).logits
        draft_logits = drafter(ids).logits
    sqnr = 10 * torch.log10(target_logits.pow(2).mean() / (target_logits - draft_logits).pow(2).mean())
    assert sqnr > 15, f"{recipe}: SQNR {sqnr:.1f} dB"
    assert drafter.report.recipe == DrafterConfig.from_name(recipe).name


def test_rebuild_follows_new_target_weights_and_bumps_the_version(tiny_llama):
    target = _copy(tiny_llama)
    drafter = build_drafter(target, INT4_G32, weights_version=3)
    ids = torch.randint(256, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = drafter(ids).logits
        for name, param in target.model.layers.named_parameters():  # a "policy update" of the linears
            if "proj" in name:
                param.add_(0.5 * torch.randn(param.shape, generator=torch.Generator().manual_seed(2)))
        stale = drafter(ids).logits
        report = drafter.rebuild(weights_version=4)
        fresh = drafter(ids).logits
        new_target = target(ids).logits
    assert torch.equal(before, stale)  # quantized copies stay stale until rebuilt
    assert report.weights_version == drafter.weights_version == 4
    assert (fresh - new_target).abs().mean() < 0.25 * (stale - new_target).abs().mean()
    drafter.check_version(4)
    with pytest.raises(RuntimeError, match="built from weights version 4, target is at 5"):
        drafter.check_version(5)


def test_failed_rebuild_keeps_the_previous_drafter(tiny_llama, monkeypatch):
    target = _copy(tiny_llama)
    drafter = build_drafter(target, INT4_G32, weights_version=1)
    module = drafter.module

    def broken(*_args, **_kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr("torchao.quantization.quantize_", broken)
    with pytest.raises(DrafterBuildError, match="kernel exploded"):
        drafter.rebuild(weights_version=2)
    assert drafter.module is module and drafter.weights_version == 1


def test_model_without_quantizable_linears_is_a_clear_build_error():
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8))
    with pytest.raises(DrafterBuildError, match="no linear layer to quantize"):
        build_drafter(model, INT4_G32)


def test_linears_that_misfit_the_group_size_are_skipped_and_reported():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(48, 64))  # 48 is not a multiple of 32
    drafter = build_drafter(model, INT4_G32)
    assert drafter.report.quantized_layers == 1
    assert drafter.report.skipped_layers == ("1",)


def test_backend_that_does_not_match_the_target_device_is_refused(tiny_llama):
    with pytest.raises(DrafterBuildError, match="backend='cuda' but the target is on 'cpu'"):
        build_drafter(tiny_llama, DrafterConfig(backend="cuda"))


def test_fp32_target_gets_bf16_activation_int4_linears_on_cpu(tiny_llama):
    """aten's CPU int4 kernel is fast with bf16 activations only; the drafter casts in and out."""
    drafter = build_drafter(tiny_llama, INT4_G32)
    q_proj = drafter.module.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "_CastActivations" and q_proj.dtype == torch.bfloat16
    assert q_proj.linear.weight.dtype == torch.bfloat16
    ids = torch.randint(256, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert drafter(ids).logits.dtype == torch.float32
    bf16_target = _copy(tiny_llama).to(torch.bfloat16)
    q_proj = build_drafter(bf16_target, INT4_G32).module.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.Linear) and _is_quantized(q_proj.weight)


def test_cpu_int4_route_is_the_opaque_kernel_and_cuda_route_is_tinygemm():
    cpu = torchao_config(INT4_G32, "cpu")
    cuda = torchao_config(DrafterConfig(group_size=128), "cuda")
    assert type(cpu).__name__ in ("PrototypeInt4WeightOnlyConfig", "Int4WeightOnlyConfig")
    assert cpu.group_size == 32 and cpu.set_inductor_config is False
    assert type(cuda).__name__ == "Int4WeightOnlyConfig" and cuda.group_size == 128
    assert str(cuda.int4_packing_format).lower().endswith("tile_packed_to_4d")


@pytest.mark.model
def test_drafter_runs_on_the_targets_kv_cache(default_model):
    """Same architecture: the drafter decodes from a cache the target filled (no second cache)."""
    from transformers import DynamicCache

    target, tokenizer = default_model
    drafter = build_drafter(target, INT4_G32)
    ids = tokenizer("Question: what is 12 times 7? Answer:", return_tensors="pt").input_ids
    with torch.inference_mode():
        cache = DynamicCache(config=target.config)
        target(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
        draft_next = drafter(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits[0, -1]
        cache.crop(ids.shape[1] - 1)
        target_next = target(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits[0, -1]
    total_variation = 0.5 * (target_next.float().softmax(-1) - draft_next.float().softmax(-1)).abs().sum()
    assert total_variation < 0.1
    assert draft_next.argmax() == target_next.argmax()


@pytest.mark.model
def test_on_grid_recipe_is_closer_to_the_default_model_than_off_grid(default_model):
    """The default model came from a Q4_1 GGUF: asymmetric group-32 int4 lands on its grid."""
    target, tokenizer = default_model
    ids = tokenizer("Tom has 3 boxes with 12 pencils each. How many pencils", return_tensors="pt").input_ids
    errors = {}
    with torch.inference_mode():
        reference = target(ids).logits.float().softmax(-1)
        for recipe in ("int4-g32", "int4-g64"):
            drafted = build_drafter(target, DrafterConfig.from_name(recipe))(ids).logits.float().softmax(-1)
            errors[recipe] = 0.5 * (reference - drafted).abs().sum(-1).mean().item()
    assert errors["int4-g32"] < 0.06
    assert errors["int4-g32"] < errors["int4-g64"] / 2


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
