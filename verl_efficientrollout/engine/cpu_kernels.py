"""The native engine's compiled CPU ops for decode steps (``csrc/decode_ops.cpp``): RoPE + KV write +
attention (``decode_attention``), RMSNorm with and without the residual add before it
(``rms_norm``, ``add_rms_norm``) and ``silu_mul``, all float32; and the int4 drafter's linear
(``int4_linear``, ``Int4Linear``: torchao's int4 grid, integer dot products on AVX512-VNNI or AVX2, a
scalar loop elsewhere; ``int4_kernel_isa`` names the path).

Built from source with the machine's C++ compiler at first use (about 10 s; ``-march=native``, so
the build is for the CPU at hand and picks its int4 path; ``$VERL_EFFICIENTROLLOUT_CPU_MARCH`` sets
another ``-march``, e.g. ``x86-64-v3`` for a cache shared by several CPU kinds), cached on disk under
``$XDG_CACHE_HOME/verl_efficientrollout`` (``~/.cache`` by default) keyed by the source, torch's
version, the flags and the CPU's flags, and loaded with ``torch.ops.load_library``. Where it cannot
be built (no compiler, a failed build) the engine runs its PyTorch ops instead, after one warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import warnings
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "decode_ops.cpp"
_FLAGS = ("-O3", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off")
MARCH_ENV = "VERL_EFFICIENTROLLOUT_CPU_MARCH"  # -march= of the build (default native: this CPU's best ISA)
_LOADED: dict[str, object | None] = {}  # compiler -> the ops (None: the build failed), one per process


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


NOTABLE_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")  # what every CPU figure names


def notable_cpu_flags() -> list[str]:
    """Which of ``NOTABLE_FLAGS`` this CPU has (the flags to name next to a measured figure)."""
    flags = _cpu_flags().split()
    return [flag for flag in NOTABLE_FLAGS if flag in flags]


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "verl_efficientrollout" / "kernels"


def _build(compiler: str) -> Path:
    """Compile the op into the cache (or find it there); returns the shared library's path."""
    from torch.utils import cpp_extension

    executable = shutil.which(compiler)
    if executable is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX to one)")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    torch_lib = Path(torch.__file__).parent / "lib"
    march = os.environ.get(MARCH_ENV) or "native"
    command = [executable, *_FLAGS, f"-march={march}", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, str(SOURCE),
               f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), torch.__version__, *command[1:], _cpu_flags()]).encode())
    target = _cache_dir() / key.hexdigest()[:16] / "decode_ops.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as partial:
        pass
    try:
        result = subprocess.run([*command, "-o", partial.name], capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
        os.replace(partial.name, target)  # atomic: a concurrent build of the same key loads either copy
    finally:
        if os.path.exists(partial.name):
            os.unlink(partial.name)
    return target


def decode_ops(compiler: str | None = None):
    """``torch.ops.verl_efficientrollout`` (the ops above), built and loaded once per process, or
    None (with one warning) where they cannot be built. ``compiler``: default ``$CXX`` or ``c++``."""
    compiler = compiler or os.environ.get("CXX") or "c++"
    if compiler not in _LOADED:
        try:
            if not hasattr(torch.ops.verl_efficientrollout, "decode_attention"):
                path = _build(compiler)
                torch.ops.load_library(str(path))
                logger.info("native engine: CPU decode ops loaded from %s", path)
            _LOADED[compiler] = torch.ops.verl_efficientrollout
        except Exception as error:  # noqa: BLE001 - any failure: the PyTorch path serves, never a crash
            warnings.warn(f"native engine: the CPU decode ops could not be built ({error}); decode steps run "
                          "PyTorch's ops instead (slower)", RuntimeWarning, stacklevel=2)
            _LOADED[compiler] = None
    return _LOADED[compiler]


def pack_int4(int_data: torch.Tensor) -> torch.Tensor:  # [N, K] integers 0..15 -> [N, K / 2] uint8
    """The int4 kernel's layout: per row, each block of 32 along K in 16 bytes, byte j = q[j] | q[j + 16] << 4."""
    n, k = int_data.shape
    if k % 32:
        raise ValueError(f"pack_int4: K must be a multiple of 32, got {k}")
    blocks = int_data.to(torch.uint8).view(n, k // 32, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:  # [N, K / 2] uint8 -> [N, K] uint8 0..15
    n = packed.shape[0]
    blocks = packed.view(n, -1, 16)
    return torch.stack((blocks & 0xF, blocks >> 4), dim=2).reshape(n, -1)


def round_int16_blocks(x: torch.Tensor) -> torch.Tensor:  # [..., K] float32 -> [..., K] float32
    """x rounded as the int4 kernel rounds its activations: per row and block of 32 along K to int16
    (scale max|x| / 32767, round half to even), returned dequantized. The PyTorch twin of the kernel's
    ``quantize_rows``."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 32767.0 / amax, torch.zeros_like(amax))
    return ((blocks * inv).round().clamp(-32767, 32767) * (amax / 32767.0)).reshape(x.shape)


class Int4Linear(torch.nn.Module):
    """A drafter linear on the compiled int4 kernel (``int4_linear``): torchao's asymmetric group-wise
    int4 grid (w = (q - 8) * scale + zero, scale and zero bfloat16 per group) times the activations
    rounded to int16 per block of 32 (``round_int16_blocks``; integer dot products on VNNI / AVX2; the
    VNNI build's chunks of 8-16 rows multiply float32 activations as they are), float32 sums. Built
    from a float linear by ``drafter._build``; the bias (if any) is the target's own tensor.
    ``reference`` is the same product in PyTorch."""

    def __init__(self, q: torch.Tensor, scale_zero: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> None:
        super().__init__()
        ops = decode_ops()
        if ops is None:
            raise RuntimeError("Int4Linear needs the compiled CPU ops, which could not be built here (see the warning)")
        self._op = ops.int4_linear
        self.in_features, self.out_features, self.group_size = 2 * q.shape[1], q.shape[0], group_size
        self.register_buffer("q", q)  # [N, K / 2] uint8 (pack_int4)
        self.register_buffer("scale_zero", scale_zero)  # [N, K / group, 2] bfloat16
        self.register_buffer("bias", bias)  # [N] float32 or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N], in x's dtype
        out = self._op(x.float(), self.q, self.scale_zero, self.bias, self.group_size)
        return out.to(x.dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N] float32: what forward computes
        """The kernel's product in PyTorch: rows in chunks of 16, 8, 4, 2, 1 as the kernel takes them;
        each chunk's activations rounded to int16 per block of 32, except chunks of 8 or more rows on
        the VNNI build, which multiply the float32 activations as they are."""
        rows, chunks, m = x.reshape(-1, x.shape[-1]).float(), [], 0
        unrounded_from = 8 if int4_kernel_isa() == "avx512-vnni" else 17
        while m < rows.shape[0]:
            chunk = next(c for c in (16, 8, 4, 2, 1) if c <= rows.shape[0] - m)
            part = rows[m : m + chunk]
            chunks.append(part if chunk >= unrounded_from else round_int16_blocks(part))
            m += chunk
        bias = None if self.bias is None else self.bias.float()
        out = torch.nn.functional.linear(torch.cat(chunks), self.dequantize(), bias)
        return out.view(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:  # [N, K] float32: the weight the kernel multiplies by
        scale, zero = self.scale_zero.float().unbind(-1)  # [N, K / group] each
        q = unpack_int4(self.q).float().view(self.out_features, -1, self.group_size)
        return ((q - 8) * scale[..., None] + zero[..., None]).view(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def int4_kernel_isa() -> str | None:
    """Which path the compiled int4 kernel runs on this CPU (avx512-vnni, avx2 or scalar; None: not built)."""
    ops = decode_ops()
    return None if ops is None else ops.int4_kernel_isa()
