"""Frozen, validated configuration objects shared by every engine (pure Python, no torch).

Build them once at the boundary (CLI, veRL adapter) and pass the objects down.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Mapping

from verl_efficientrollout._validate import check_choice, check_float, check_int

if TYPE_CHECKING:
    from verl_efficientrollout.controller import ControllerConfig


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. ``temperature == 0`` means greedy (argmax).

    ``top_k = 0`` and ``top_p = 1.0`` switch those filters off.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        check_float("SamplingParams", "temperature", self.temperature, low=0.0)
        check_int("SamplingParams", "top_k", self.top_k, low=0)
        check_float("SamplingParams", "top_p", self.top_p, low=0.0, high=1.0, low_open=True)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


DRAFTER_RECIPES = ("int4", "int8")
DRAFTER_BACKENDS = ("auto", "cpu", "cuda")
INT4_GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class DrafterConfig:
    """The int4 self-drafter: a weight-only quantized copy of the target's decoder linears.

    ``recipe="int4"`` is asymmetric (scale and zero point) group-wise int4 through torchao;
    ``recipe="int8"`` is per-channel int8 weight-only, the fallback where int4 has no kernel.
    Embeddings, lm_head and norms are always shared with the target, never copied.
    """

    recipe: str = "int4"
    group_size: int = 32
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_choice("DrafterConfig", "recipe", self.recipe, DRAFTER_RECIPES)
        if self.recipe == "int4":
            check_choice("DrafterConfig", "group_size", self.group_size, INT4_GROUP_SIZES)
        check_choice("DrafterConfig", "backend", self.backend, DRAFTER_BACKENDS)

    @property
    def name(self) -> str:
        """Short recipe name reported next to every acceptance or speed figure."""
        if self.recipe == "int8":
            return "int8-per-channel"
        return f"int4-asym-g{self.group_size}"

    @property
    def method_name(self) -> str:
        """The name our vLLM and SGLang plugins register this recipe under as a quantization method."""
        return "efficient_int8" if self.recipe == "int8" else f"efficient_int4_g{self.group_size}"

    @classmethod
    def every_recipe(cls) -> list["DrafterConfig"]:
        """One config per recipe: int4 at each group size, then int8."""
        return [cls(recipe="int4", group_size=g) for g in INT4_GROUP_SIZES] + [cls(recipe="int8")]

    @classmethod
    def from_name(cls, name: str, backend: str = "auto") -> "DrafterConfig":
        """Parse ``int4-g32`` / ``int4-asym-g64`` / ``int8`` (the names the CLI and reports use)."""
        parts = name.strip().lower().replace("int8-per-channel", "int8").split("-")
        if parts == ["int8"]:
            return cls(recipe="int8", backend=backend)
        if parts[0] == "int4" and len(parts) in (2, 3) and parts[-1][:1] == "g" and parts[-1][1:].isdigit():
            group_size = int(parts[-1][1:])
            if (len(parts) == 2 or parts[1] == "asym") and group_size in INT4_GROUP_SIZES:
                return cls(recipe="int4", group_size=group_size, backend=backend)
        allowed = ", ".join(f"int4-g{g}" for g in INT4_GROUP_SIZES) + ", int8"
        raise ValueError(f"drafter recipe must be one of {allowed}, got {name!r}")


ENGINES = ("native", "vllm", "sglang")
MEASURED_ENGINES = ("native", "vllm")  # what `efficient-rollout bench` and `calibrate` run (not SGLang yet)
DTYPES = ("float32", "bfloat16", "float16")


NATIVE_DTYPES = ("auto", *DTYPES)
DECODE_GRAPH_MODES = ("auto", "off", "padded", "on")


@dataclass(frozen=True)
class NativeEngineConfig:
    """The native engine's own settings. ``device='auto'`` picks CUDA when torch sees a GPU.

    ``dtype='auto'`` decides by measurement when the engine starts: bfloat16 on CUDA; on a CPU it
    times a target step and a drafter step in float32 and in bfloat16 at 1 and 16 rows and keeps
    the faster (bf16 pays where the CPU has AVX512-BF16 or AMX, fp32 where bf16 is emulated).
    ``decode_graphs``: ``auto`` (CUDA graphs on CUDA, eager on a CPU), ``on``, ``off`` (eager at
    exact batch sizes) or ``padded`` (eager through the graphs' batch buckets and padding: the
    graph path's logic, runnable on a CPU). ``pack_cpu_linears``: on a CPU, every decoder linear
    and the lm_head also keep a oneDNN pre-packed copy of their weights, which decode's few-row
    GEMMs run from (faster; twice the weight memory). ``cpu_decode_ops``: on a CPU in float32,
    decode steps (one token per row, the drafter's steps, a verify) run their norms, RoPE + KV
    write + attention and SiLU-multiply as C++ ops built with the machine's compiler at first use
    (``engine/cpu_kernels.py``); where they cannot be built, PyTorch's ops serve after one warning."""

    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "cpu"  # auto | cpu | cuda | cuda:N
    max_model_len: int = 2048  # prompt + new tokens per request
    decode_graphs: str = "auto"  # auto | on | off | padded
    # CPU: run the linears from oneDNN pre-packed weights (faster few-row GEMMs; a second weight copy)
    pack_cpu_linears: bool = True
    # CPU, float32: decode steps' norms, RoPE + KV write + attention, SiLU-mul as compiled ops
    cpu_decode_ops: bool = True

    def __post_init__(self) -> None:
        check_choice("NativeEngineConfig", "dtype", self.dtype, NATIVE_DTYPES)
        for name in ("pack_cpu_linears", "cpu_decode_ops"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"NativeEngineConfig.{name} must be true or false, got {getattr(self, name)!r}")
        check_int("NativeEngineConfig", "max_model_len", self.max_model_len, low=2)
        check_choice("NativeEngineConfig", "decode_graphs", self.decode_graphs, DECODE_GRAPH_MODES)
        if self.decode_graphs == "on" and self.device == "cpu":
            raise ValueError("NativeEngineConfig.decode_graphs='on' needs device cuda, cuda:N or auto, got device "
                             "'cpu' (allowed on a CPU: auto, off, padded)")
        device = self.device
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            raise ValueError(f"NativeEngineConfig.device must be one of auto, cpu, cuda, cuda:N, got {device!r}")


VLLM_PROPOSERS = ("self", "draft-model")
# vllm.LLM arguments the backend sets itself: llm_args may not override them.
VLLM_MANAGED_ARGS = ("model", "speculative_config", "scheduler_cls", "worker_cls", "worker_extension_cls",
                     "additional_config", "seed")


@dataclass(frozen=True)
class VLLMEngineConfig:
    """The vLLM backend's own settings (``vllm.LLM`` arguments this add-on sets).

    ``proposer``: ``self`` (default), the int4 self-drafter on the target's KV cache (no KV of its
    own, nothing run at K = 0); ``draft-model``, vLLM's ``draft_model`` method with the same int4
    recipe (its drafter keeps a KV cache of its own and runs a forward every step): the old route,
    for comparison. ``llm_args``: further ``vllm.LLM`` keyword arguments, passed as given (vLLM
    validates them when the engine starts), except those the backend sets itself."""

    dtype: str = "bfloat16"
    max_model_len: int = 2048
    max_num_seqs: int = 256
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.5  # CUDA only
    cpu_kv_cache_gib: float = 2.0  # CPU only (VLLM_CPU_KVCACHE_SPACE)
    proposer: str = "self"
    llm_args: Mapping[str, Any] = field(default_factory=dict, hash=False)  # a dict: left out of the hash

    def __post_init__(self) -> None:
        check_choice("VLLMEngineConfig", "proposer", self.proposer, VLLM_PROPOSERS)
        if not isinstance(self.llm_args, Mapping) or not all(isinstance(k, str) for k in self.llm_args):
            raise ValueError(f"VLLMEngineConfig.llm_args must be a mapping of vllm.LLM argument names to values, "
                             f"got {self.llm_args!r}")
        managed = sorted(set(self.llm_args) & set(VLLM_MANAGED_ARGS))
        if managed:
            raise ValueError(f"VLLMEngineConfig.llm_args may not set {managed}: the backend sets "
                             f"{', '.join(VLLM_MANAGED_ARGS)} itself")
        object.__setattr__(self, "llm_args", dict(self.llm_args))
        check_choice("VLLMEngineConfig", "dtype", self.dtype, DTYPES)
        check_int("VLLMEngineConfig", "max_model_len", self.max_model_len, low=2)
        check_int("VLLMEngineConfig", "max_num_seqs", self.max_num_seqs, low=1)
        check_float("VLLMEngineConfig", "gpu_memory_utilization", self.gpu_memory_utilization, low=0.0, high=1.0,
                    low_open=True)
        check_float("VLLMEngineConfig", "cpu_kv_cache_gib", self.cpu_kv_cache_gib, low=0.0, low_open=True)


@dataclass(frozen=True)
class SGLangEngineConfig:
    """The SGLang backend's own settings (``sglang.Engine`` server arguments this add-on sets).

    ``max_total_tokens``: the KV cache's size in tokens (0: SGLang sizes it from
    ``mem_fraction_static``). ``server_args``: any further ``ServerArgs`` fields, passed through
    as given (SGLang validates them when the engine starts)."""

    dtype: str = "bfloat16"
    max_model_len: int = 2048
    max_num_seqs: int = 256
    disable_cuda_graph: bool = True
    mem_fraction_static: float = 0.5  # CUDA only: the share of GPU memory SGLang may take
    max_total_tokens: int = 0
    server_args: Mapping[str, Any] = field(default_factory=dict, hash=False)  # a dict: left out of the hash

    def __post_init__(self) -> None:
        check_choice("SGLangEngineConfig", "dtype", self.dtype, DTYPES)
        check_int("SGLangEngineConfig", "max_model_len", self.max_model_len, low=2)
        check_int("SGLangEngineConfig", "max_num_seqs", self.max_num_seqs, low=1)
        check_float("SGLangEngineConfig", "mem_fraction_static", self.mem_fraction_static, low=0.0, high=1.0,
                    low_open=True)
        check_int("SGLangEngineConfig", "max_total_tokens", self.max_total_tokens, low=0)
        if not isinstance(self.server_args, Mapping) or not all(isinstance(k, str) for k in self.server_args):
            raise ValueError(f"SGLangEngineConfig.server_args must be a mapping of ServerArgs field names to values, "
                             f"got {self.server_args!r}")
        object.__setattr__(self, "server_args", dict(self.server_args))


@dataclass(frozen=True)
class EfficientRolloutConfig:
    """Everything the add-on reads from a rollout config (``rollout.custom.efficient`` in veRL).

    ``from_dict`` takes the plain mapping found in YAML::

        engine: native
        drafter: {recipe: int4, group_size: 32}
        controller: {preset: efficient, gamma_max: 6}   # a preset plus field overrides
        native: {dtype: bfloat16, device: auto}          # the native engine's settings
        vllm: {dtype: bfloat16, max_num_seqs: 256}      # the vLLM backend's settings
        sglang: {dtype: bfloat16, max_num_seqs: 256}    # the SGLang backend's settings
    """

    engine: str = "native"
    drafter: DrafterConfig = DrafterConfig()
    native: NativeEngineConfig = NativeEngineConfig()
    vllm: VLLMEngineConfig = VLLMEngineConfig()
    sglang: SGLangEngineConfig = SGLangEngineConfig()
    controller: "ControllerConfig" = None  # type: ignore[assignment]  # filled in __post_init__

    def __post_init__(self) -> None:
        from verl_efficientrollout.controller import ControllerConfig

        check_choice("EfficientRolloutConfig", "engine", self.engine, ENGINES)
        if self.controller is None:
            object.__setattr__(self, "controller", ControllerConfig())
        if not isinstance(self.drafter, DrafterConfig):
            raise ValueError(f"EfficientRolloutConfig.drafter must be a DrafterConfig, got {type(self.drafter).__name__}")
        if not isinstance(self.vllm, VLLMEngineConfig):
            raise ValueError(f"EfficientRolloutConfig.vllm must be a VLLMEngineConfig, got {type(self.vllm).__name__}")
        if not isinstance(self.sglang, SGLangEngineConfig):
            raise ValueError(
                f"EfficientRolloutConfig.sglang must be a SGLangEngineConfig, got {type(self.sglang).__name__}")
        if not isinstance(self.native, NativeEngineConfig):
            raise ValueError(f"EfficientRolloutConfig.native must be a NativeEngineConfig, got {type(self.native).__name__}")
        if not isinstance(self.controller, ControllerConfig):
            raise ValueError(
                f"EfficientRolloutConfig.controller must be a ControllerConfig, got {type(self.controller).__name__}"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "EfficientRolloutConfig":
        from verl_efficientrollout.controller import ControllerConfig

        d = dict(d or {})
        allowed = ("engine", "drafter", "controller", "native", "vllm", "sglang")
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"EfficientRolloutConfig got unknown keys {unknown}; allowed keys: {', '.join(allowed)}")
        drafter = d.get("drafter") or {}
        if isinstance(drafter, str):  # the short name, e.g. "int4-g32"
            drafter = DrafterConfig.from_name(drafter)
        else:
            drafter = DrafterConfig(**_known_keys(DrafterConfig, drafter))
        controller = dict(d.get("controller") or {})
        preset = controller.pop("preset", None)
        return cls(
            engine=d.get("engine", "native"),
            drafter=drafter,
            native=NativeEngineConfig(**_known_keys(NativeEngineConfig, d.get("native") or {})),
            vllm=VLLMEngineConfig(**_known_keys(VLLMEngineConfig, d.get("vllm") or {})),
            sglang=SGLangEngineConfig(**_known_keys(SGLangEngineConfig, d.get("sglang") or {})),
            controller=ControllerConfig.preset(preset, **controller) if preset else ControllerConfig.from_dict(controller),
        )


def _known_keys(cls, mapping: Mapping[str, Any]) -> dict[str, Any]:
    """``mapping`` as keyword arguments of dataclass ``cls``; unknown keys are an error naming them."""
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise ValueError(f"{cls.__name__} got unknown keys {unknown}; allowed keys: {', '.join(sorted(allowed))}")
    return dict(mapping)
