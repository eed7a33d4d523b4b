"""The int4 self-drafter: a weight-only quantized view of the target, rebuilt at every weight sync.

``build_drafter(target, config)`` returns a :class:`Drafter` whose module has the target's exact
architecture (so it can run on the target's KV cache) and shares every tensor with the target
(embeddings, lm_head, norms, rotary buffers: same storage, no copy) except the decoder's linear
weights, which torchao quantizes weight-only:

* CPU, int4: ``PrototypeInt4WeightOnlyConfig`` (asymmetric, scale + zero point per group), whose
  opaque packing reaches aten's ``_weight_int4pack_mm_for_cpu`` kernel.
* CUDA, int4: ``Int4WeightOnlyConfig`` with the ``tile_packed_to_4d`` (tinygemm) packing,
  asymmetric like the CPU route.
* int8 (either device): ``Int8WeightOnlyConfig``, per-channel; the fallback option.

A build failure raises :class:`DrafterBuildError`; callers catch it and decode without speculation.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from verl_efficientrollout.config import DrafterConfig

logger = logging.getLogger(__name__)

# Linear layers kept in full precision and shared: the output head (often tied to the embeddings).
_SHARED_LINEAR_NAMES = ("lm_head", "output", "embed_out")
_MIN_TORCHAO = (0, 14)
INT4_KERNELS = ("auto", "native", "torchao")  # build_drafter's kernel choices


class DrafterBuildError(RuntimeError):
    """The drafter could not be built; decode without speculation."""


@dataclass(frozen=True)
class DrafterReport:
    recipe: str
    backend: str
    weights_version: int
    quantized_layers: int
    skipped_layers: tuple[str, ...]  # linears left in full precision (shared head, shape misfit)
    target_bytes: int  # all target parameters and buffers
    shared_bytes: int  # target tensors the drafter uses as they are (same storage)
    drafter_bytes: int  # tensors the drafter owns: quantized weights, scales, zero points
    quantized_source_bytes: int  # what those quantized linears take in the target's dtype
    build_seconds: float
    kernel: str = "torchao"  # what runs the quantized linears: torchao's kernels, or native-int4-<isa> (cpu_kernels)

    @property
    def drafter_total_bytes(self) -> int:
        """Bytes a drafter forward streams: its own weights plus the shared ones."""
        return self.drafter_bytes + self.shared_bytes


class Drafter:
    """The drafter module plus the target weights version it was built from."""

    def __init__(self, target: nn.Module, config: DrafterConfig, weights_version: int = 0, kernel: str = "auto") -> None:
        if kernel not in INT4_KERNELS:
            raise ValueError(f"drafter kernel must be one of {', '.join(INT4_KERNELS)}, got {kernel!r}")
        self.target = target
        self.config = config
        self.kernel = kernel
        self.module, self.report = _build(target, config, weights_version, kernel)

    @property
    def weights_version(self) -> int:
        return self.report.weights_version

    def rebuild(self, weights_version: int) -> DrafterReport:
        """Re-quantize from the target's current weights; on failure the old drafter stays."""
        self.module, self.report = _build(self.target, self.config, weights_version, self.kernel)
        return self.report

    def check_version(self, weights_version: int) -> None:
        if weights_version != self.weights_version:
            raise RuntimeError(
                f"drafter was built from weights version {self.weights_version}, target is at "
                f"{weights_version}: call rebuild() after every weight update"
            )

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def build_drafter(target: nn.Module, config: DrafterConfig, weights_version: int = 0, kernel: str = "auto") -> Drafter:
    """``kernel``: "auto" runs an int4 drafter of a float32 native CPU target on the compiled int4 kernel
    (``native_int4``) and torchao's kernels elsewhere; "native" the compiled kernel for any dtype where it
    is built (a bfloat16 target casts in and out; slower than torchao's there at 4 and 16 rows,
    measured); "torchao" always torchao's (the baseline the int4 kernel is measured against)."""
    return Drafter(target, config, weights_version, kernel)


def resolve_backend(config: DrafterConfig, target: nn.Module) -> str:
    device = next(target.parameters()).device.type
    backend = device if config.backend == "auto" else config.backend
    if backend != device:
        raise DrafterBuildError(f"DrafterConfig.backend={config.backend!r} but the target is on {device!r}")
    if backend not in ("cpu", "cuda"):
        raise DrafterBuildError(f"no weight-only quantization route for device {device!r} (allowed: cpu, cuda)")
    return backend


def torchao_config(config: DrafterConfig, backend: str):
    """The torchao config for a recipe and device; the one place that knows torchao's names."""
    try:
        import torchao
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    except ImportError as exc:
        raise DrafterBuildError(f"torchao is needed for the drafter: pip install 'torchao>=0.14' ({exc})") from exc
    version = tuple(int(p) for p in torchao.__version__.split("+")[0].split(".")[:2] if p.isdigit())
    if version < _MIN_TORCHAO:
        raise DrafterBuildError(f"torchao {torchao.__version__} is too old: pip install 'torchao>=0.14'")
    if config.recipe == "int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    if backend == "cuda":
        return Int4WeightOnlyConfig(
            group_size=config.group_size, int4_packing_format="tile_packed_to_4d", set_inductor_config=False
        )
    try:  # torchao >= 0.15 moved the CPU int4 route to a prototype config
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    except ImportError:
        return Int4WeightOnlyConfig(group_size=config.group_size, int4_packing_format="opaque", set_inductor_config=False)
    return PrototypeInt4WeightOnlyConfig(group_size=config.group_size, set_inductor_config=False)


def _build(target: nn.Module, config: DrafterConfig, weights_version: int, kernel: str = "auto") -> tuple[nn.Module, DrafterReport]:
    start = time.perf_counter()
    backend = resolve_backend(config, target)
    selected, skipped = _select_linears(target, config)
    if not selected:
        raise DrafterBuildError(
            f"{type(target).__name__} has no linear layer to quantize with {config.name} "
            f"(skipped: {', '.join(skipped) or 'none found'}); the drafter needs nn.Linear decoder layers"
        )
    misfits = [fqn for fqn in skipped if fqn.rsplit(".", 1)[-1] not in _SHARED_LINEAR_NAMES]
    if misfits:
        logger.warning("drafter %s: %d of %d decoder linears stay in full precision (in_features not a multiple "
                       "of the group size %d), e.g. %s", config.name, len(misfits), len(misfits) + len(selected),
                       config.group_size, misfits[0])
    drafter = _shallow_clone(target)
    compute_dtype = activation_dtype(config, backend, next(target.parameters()).dtype)
    native = native_int4(target, config, backend, kernel)
    try:
        from torchao.quantization import quantize_

        ao_config = torchao_config(config, backend)
        for fqn in selected:
            parent_name, _, leaf = fqn.rpartition(".")
            parent = drafter.get_submodule(parent_name)
            linear = getattr(parent, leaf)
            if native:
                setattr(parent, leaf, _native_int4_linear(linear, config.group_size))
                continue
            if compute_dtype is not None:
                linear = _cast_copy(linear, compute_dtype)
            quantize_(linear, ao_config)
            if _is_plain(linear.weight):
                raise DrafterBuildError(f"torchao left {fqn} unquantized ({config.name})")
            setattr(parent, leaf, linear if compute_dtype is None else _CastActivations(linear, compute_dtype))
    except DrafterBuildError:
        raise
    except Exception as exc:  # torchao raises many kinds; all mean "no drafter"
        raise DrafterBuildError(f"quantizing the drafter with {config.name} failed: {exc!r}") from exc
    if native:
        from verl_efficientrollout.engine.cpu_kernels import int4_kernel_isa

        kernel = f"native-int4-{int4_kernel_isa()}"
    else:
        kernel = "torchao"
    report = _report(target, drafter, selected, skipped, config, backend, weights_version, start, kernel)
    return drafter, report


def native_int4(target: nn.Module, config: DrafterConfig, backend: str, kernel: str = "auto") -> bool:
    """Whether the drafter's linears run the native engine's compiled int4 kernel (``cpu_kernels``): for
    an int4 recipe on a CPU, with ``kernel="auto"`` where the target's compiled decode ops serve (a
    float32 native target with ``NativeEngineConfig.cpu_decode_ops``; where they could not be built
    ``cpu_kernels`` has warned once already), with ``kernel="native"`` wherever the ops build."""
    if backend != "cpu" or config.recipe != "int4" or kernel == "torchao":
        return False
    if kernel == "auto":
        return getattr(target, "decode_ops", None) is not None
    from verl_efficientrollout.engine.cpu_kernels import decode_ops

    if decode_ops() is None:
        raise DrafterBuildError("drafter kernel 'native' needs the compiled CPU ops, which could not be built "
                                "here (see the warning above); use kernel 'auto' or 'torchao'")
    return True


def tinygemm_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchao's asymmetric group-wise int4 of ``weight`` [N, K], exactly as ``Int4OpaqueTensor.from_hp``
    (``PrototypeInt4WeightOnlyConfig``) quantizes it before packing: integers [N, K] in 0..15, scale and
    zero [N, K / group] in the weight's dtype, w ~ (q - 8) * scale + zero. The one place that names
    torchao's private primitives."""
    try:
        from torchao.quantization.quant_primitives import (
            MappingType,
            _choose_qparams_affine_tinygemm,
            _quantize_affine_tinygemm,
        )
    except ImportError as exc:
        import torchao

        raise DrafterBuildError(
            f"torchao {torchao.__version__} has no tinygemm int4 primitives (_choose_qparams_affine_tinygemm, "
            f"_quantize_affine_tinygemm; tested with torchao 0.14-0.18): install torchao>=0.14,<0.19 or set "
            f"native.cpu_decode_ops=false to run torchao's own int4 kernel ({exc})") from exc
    block = [1, group_size]
    scale, zero = _choose_qparams_affine_tinygemm(weight, MappingType.ASYMMETRIC, block, torch.int32, 0, 15, 1e-6,
                                                  None, weight.dtype)
    int_data = _quantize_affine_tinygemm(weight, block, scale, zero, torch.int32, 0, 15)
    return int_data, scale.reshape(weight.shape[0], -1), zero.reshape(weight.shape[0], -1)


def _native_int4_linear(linear: nn.Linear, group_size: int) -> nn.Module:
    """The native int4 kernel's linear for ``linear``: torchao's grid of its bfloat16 weight (the very
    integers, scales and zeros torchao's CPU route packs), re-laid for the kernel."""
    from verl_efficientrollout.engine.cpu_kernels import Int4Linear, pack_int4

    int_data, scale, zero = tinygemm_int4(linear.weight.detach().to(torch.bfloat16), group_size)
    scale_zero = torch.stack((scale, zero), dim=-1).to(torch.bfloat16).contiguous()
    return Int4Linear(pack_int4(int_data), scale_zero, linear.bias, group_size)


class _CastActivations(nn.Module):
    """Runs a quantized linear in ``dtype`` inside a model of another dtype (casts in and out)."""

    def __init__(self, linear: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.linear, self.dtype = linear, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.to(self.dtype)).to(x.dtype)


def activation_dtype(config: DrafterConfig, backend: str, target_dtype: torch.dtype) -> torch.dtype | None:
    """An int4 drafter of a non-bf16 target computes its linears in bf16: CUDA's tinygemm packing
    takes bf16 only, and aten's CPU int4 kernel is fast with bf16 activations only (7x slower in
    fp32 on an AVX2 CPU, measured)."""
    if backend in ("cpu", "cuda") and config.recipe == "int4" and target_dtype != torch.bfloat16:
        return torch.bfloat16
    return None


def linear_in_dtype(x: torch.Tensor, weight, bias: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor:
    """``F.linear`` computed in ``dtype`` (``activation_dtype``'s choice; None: as ``x`` comes),
    returned in ``x``'s dtype. x: [..., in] -> [..., out]."""
    if dtype is None or x.dtype == dtype:  # a bias a CPU kernel kept in float32 follows x
        return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
    out = torch.nn.functional.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))
    return out.to(x.dtype)


def _cast_copy(linear: nn.Linear, dtype: torch.dtype) -> nn.Linear:
    copy_ = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    copy_.weight = nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)
    if linear.bias is not None:
        copy_.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
    return copy_


def _select_linears(target: nn.Module, config: DrafterConfig) -> tuple[set[str], tuple[str, ...]]:
    selected, skipped = set(), []
    for fqn, module in target.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        leaf = fqn.rsplit(".", 1)[-1]
        misfit = config.recipe == "int4" and module.in_features % config.group_size != 0
        if leaf in _SHARED_LINEAR_NAMES or misfit:
            skipped.append(fqn)
        else:
            selected.add(fqn)
    return selected, tuple(skipped)


def _shallow_clone(module: nn.Module) -> nn.Module:
    """A module tree of the same classes whose parameters and buffers are the target's own objects.

    quantize_ then swaps parameters in the clone's dicts only, leaving the target untouched.
    """
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {name: _shallow_clone(child) for name, child in module._modules.items()}
    return clone


def _is_plain(tensor: torch.Tensor) -> bool:
    return type(tensor) in (torch.Tensor, nn.Parameter) or type(tensor.data) is torch.Tensor


def tensor_bytes(tensor: torch.Tensor) -> int:
    if _is_plain(tensor):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()  # torchao tensor subclasses: sum their inner tensors
    return sum(tensor_bytes(getattr(tensor, name)) for name in names)


def _unique_tensors(module: nn.Module) -> dict[int, torch.Tensor]:
    tensors = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        tensors.setdefault(id(tensor), tensor)
    return tensors


def _report(target, drafter, selected, skipped, config, backend, weights_version, start, kernel) -> DrafterReport:
    target_tensors, drafter_tensors = _unique_tensors(target), _unique_tensors(drafter)
    shared = {k: t for k, t in drafter_tensors.items() if k in target_tensors}
    owned = {k: t for k, t in drafter_tensors.items() if k not in target_tensors}
    source = sum(tensor_bytes(target.get_submodule(fqn).weight) for fqn in selected)
    return DrafterReport(
        recipe=config.name,
        backend=backend,
        weights_version=weights_version,
        quantized_layers=len(selected),
        skipped_layers=skipped,
        target_bytes=sum(tensor_bytes(t) for t in target_tensors.values()),
        shared_bytes=sum(tensor_bytes(t) for t in shared.values()),
        drafter_bytes=sum(tensor_bytes(t) for t in owned.values()),
        quantized_source_bytes=source,
        build_seconds=time.perf_counter() - start,
        kernel=kernel,
    )
