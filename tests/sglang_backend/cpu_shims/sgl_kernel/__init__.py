"""Import shim for ``sgl_kernel`` (see ../README.md): the names SGLang 0.5.12 imports on CPU."""

from _cpu_import_shim import unavailable

__version__ = "0.0.0+cpu-import-shim"

causal_conv1d_fwd = unavailable("sgl_kernel.causal_conv1d_fwd")
causal_conv1d_update = unavailable("sgl_kernel.causal_conv1d_update")
