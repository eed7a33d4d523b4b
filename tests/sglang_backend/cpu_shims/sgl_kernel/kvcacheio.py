"""Import shim for ``sgl_kernel.kvcacheio`` (host KV-cache transfer kernels; see ../README.md)."""

from _cpu_import_shim import unavailable

_NAMES = (
    "transfer_kv_all_layer", "transfer_kv_all_layer_direct_lf_pf", "transfer_kv_all_layer_lf_pf",
    "transfer_kv_all_layer_lf_ph", "transfer_kv_all_layer_mla", "transfer_kv_all_layer_mla_lf_pf",
    "transfer_kv_direct", "transfer_kv_per_layer", "transfer_kv_per_layer_direct_pf_lf", "transfer_kv_per_layer_mla",
    "transfer_kv_per_layer_mla_pf_lf", "transfer_kv_per_layer_pf_lf", "transfer_kv_per_layer_ph_lf",
)
globals().update({name: unavailable(f"sgl_kernel.kvcacheio.{name}") for name in _NAMES})
