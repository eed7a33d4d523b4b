"""The native engine's compiled CPU ops for decode steps (``csrc/decode_ops.cpp``): RoPE + KV write +
attention (``decode_attention``), RMSNorm with and without the residual add before it
(``rms_norm``, ``add_rms_norm``) and ``silu_mul``, all float32.

Built from source with the machine's C++ compiler at first use (about 10 s; ``-march=native``, so
the build is for the CPU at hand), cached on disk under ``$XDG_CACHE_HOME/verl_efficientrollout``
(``~/.cache`` by default) keyed by the source, torch's version, the flags and the CPU's flags, and
loaded with ``torch.ops.load_library``. Where it cannot be built (no compiler, a failed build) the
engine runs its PyTorch ops instead, after one warning.
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
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off")
_LOADED: dict[str, object | None] = {}  # compiler -> the ops (None: the build failed), one per process


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


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
    command = [executable, *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, str(SOURCE),
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
