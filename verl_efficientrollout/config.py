"""Frozen, validated configuration objects shared by every engine (pure Python, no torch).

Build them once at the boundary (CLI, veRL adapter) and pass the objects down.
"""

from __future__ import annotations

from dataclasses import dataclass

from verl_efficientrollout._validate import check_choice, check_float, check_int


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
