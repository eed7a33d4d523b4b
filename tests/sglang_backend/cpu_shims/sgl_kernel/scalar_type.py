"""Import shim for ``sgl_kernel.scalar_type`` (quantized weight types of CUDA kernels; see
../README.md). SGLang reads these names when its quantization modules load; only GPU kernels use them."""


class ScalarType:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"ScalarType({self.name!r}, import shim)"


class scalar_types:  # noqa: N801 (the real module's name)
    uint4 = ScalarType("uint4")
    uint4b8 = ScalarType("uint4b8")
    uint8 = ScalarType("uint8")
    uint8b128 = ScalarType("uint8b128")
