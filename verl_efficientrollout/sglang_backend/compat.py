"""The SGLang internals this backend relies on, one function each, with a version check.

Written for SGLang >= 0.5.12 (what verl 0.9.1's ``sglang`` extra pins); run here with 0.5.12 on a
CPU (plain decoding, weight updates, the drafter's quantization), never on a GPU so far.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os

logger = logging.getLogger(__name__)

SUPPORTED_SGLANG = ((0, 5, 12), (0, 6, 0))  # >= 0.5.12, < 0.6


def sglang_version() -> tuple[str, tuple[int, ...]]:
    """(version string, (major, minor, patch)) of the installed SGLang, or an actionable error."""
    try:
        version = importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError("SGLang is not installed: pip install 'verl-efficientrollout[sglang]'") from None
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:3] if p.isdigit())
    low, high = SUPPORTED_SGLANG
    if not low <= parts < high:
        raise RuntimeError(f"SGLang {version} is not supported by verl-efficientrollout's SGLang backend: it needs "
                           f"sglang>={'.'.join(map(str, low))},<{'.'.join(map(str, high))}")
    return version, parts


def on_cpu() -> bool:
    """No CUDA device: SGLang's CPU engine (torch-native attention) serves."""
    import torch

    return not torch.cuda.is_available()


def platform_env() -> dict[str, str]:
    """Environment SGLang reads before an engine starts. On a CPU machine its CPU engine path
    (``SGLANG_USE_CPU_ENGINE``: without it the rotary embedding imports vLLM's CUDA kernels) and the
    native KV move (its Triton KV-copy kernel needs a GPU driver)."""
    if not on_cpu():
        return {}
    return {"SGLANG_USE_CPU_ENGINE": "1", "SGLANG_NATIVE_MOVE_KV_CACHE": "1"}


def check_cpu_engine() -> None:
    """On a CPU machine SGLang must have read ``SGLANG_USE_CPU_ENGINE=1`` when it was first
    imported: dozens of its modules copy ``is_cpu()`` into a module constant at import time. A
    process that imported SGLang earlier without it would drive the GPU code paths and kill the
    engine at start-up; say so instead."""
    if not on_cpu():
        return
    from sglang.srt.utils.common import is_cpu

    if not is_cpu():
        raise RuntimeError("SGLang was imported in this process before SGLANG_USE_CPU_ENGINE=1 was set, so it "
                           "took this CPU machine for a GPU one: set SGLANG_USE_CPU_ENGINE=1 (and "
                           "SGLANG_NATIVE_MOVE_KV_CACHE=1) in the environment before anything imports sglang")


def platform_server_args(mem_fraction_static: float) -> dict:
    """``ServerArgs`` this machine needs: on CPU the CPU device with torch-native attention; on a
    GPU the share of memory SGLang may take (it shares the GPU with the trainer)."""
    if on_cpu():
        return {"device": "cpu", "attention_backend": "torch_native", "mem_fraction_static": 0.3}
    return {"mem_fraction_static": mem_fraction_static}


def quantization_api():
    """(``QUANTIZATION_METHODS``, ``BASE_QUANTIZATION_METHODS``, ``add_quantization_method_choices``,
    ``QuantizationConfig``, ``UnquantizedLinearMethod``, ``LinearBase``): SGLang has no register
    function; a method is a ``QuantizationConfig`` class added to the registry dicts and the CLI choices."""
    sglang_version()
    from sglang.srt.layers import quantization
    from sglang.srt.layers.linear import LinearBase
    from sglang.srt.layers.quantization.base_config import QuantizationConfig
    from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod
    from sglang.srt.server_args import add_quantization_method_choices

    return (quantization.QUANTIZATION_METHODS, quantization.BASE_QUANTIZATION_METHODS,
            add_quantization_method_choices, QuantizationConfig, UnquantizedLinearMethod, LinearBase)


def hook_registry():
    """SGLang's plugin hooks: (``HookRegistry``, ``HookType``)."""
    sglang_version()
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    return HookRegistry, HookType


# Dotted paths of the SGLang functions our plugin hooks (0.5.12).
MODEL_RUNNER_UPDATE = "sglang.srt.model_executor.model_runner.ModelRunner.update_weights_from_tensor"
STANDALONE_V2_INIT = "sglang.srt.speculative.standalone_worker_v2.StandaloneWorkerV2.__init__"
KV_COPY_WARMUP = "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._init_kv_copy_and_warmup"


def register_fixes() -> None:
    """Hooks around two SGLang 0.5.12 problems on our path:

    * ``StandaloneWorkerV2.__init__`` never sets ``tp_rank``, which its weight update reads
      (``eagle_worker_v2.py``): every ``update_weights_from_tensor`` of a STANDALONE engine with
      the default overlap scheduler killed the engine. The hook sets it when it is missing.
    * On a CPU the KV pool's Triton copy kernel is warmed up whenever speculation is on and
      fails without a GPU driver; there the warm-up is skipped (``SGLANG_NATIVE_MOVE_KV_CACHE``
      moves KV with torch instead)."""
    registry, kind = hook_registry()

    def set_tp_rank(result, self, *args, **kwargs):
        if not hasattr(self, "tp_rank"):
            self.tp_rank = kwargs.get("tp_rank", args[2] if len(args) > 2 else 0)
        return result

    registry.register(STANDALONE_V2_INIT, set_tp_rank, kind.AFTER)
    if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
        def no_triton_warmup(self, *args, **kwargs):
            self._kv_copy_config = None

        registry.register(KV_COPY_WARMUP, no_triton_warmup, kind.REPLACE)


def shutdown_engine(engine) -> None:
    """Stop one ``sglang.Engine``'s own processes (schedulers, detokenizer) and leave the rest.

    SGLang 0.5.12's ``Engine.shutdown`` kills every child process of the calling process
    (``kill_process_tree(os.getpid(), include_parent=False)``): with two engines in one process
    (a plain and a speculative one, a fresh reference engine in a test) closing one killed the
    other's scheduler, and SGLang's watchdog then sent SIGQUIT to the whole process. The engine's
    subprocess watchdog holds exactly its own processes; where that is missing (another SGLang),
    ``Engine.shutdown`` runs, with a warning that it stops every SGLang engine of this process."""
    version, _ = sglang_version()
    watchdog = getattr(getattr(engine, "tokenizer_manager", None), "_subprocess_watchdog", None)
    processes = getattr(watchdog, "_processes", None)
    if processes is None:
        logger.warning("SGLang %s: no subprocess watchdog on the engine; closing it with Engine.shutdown, which also "
                       "stops every other SGLang engine of this process", version)
        engine.shutdown()
        return
    from sglang.srt.utils import kill_process_tree

    watchdog.stop()
    for process in processes:
        if process.pid is not None and process.is_alive():
            kill_process_tree(process.pid, include_parent=True, wait_timeout=60)


def received_output_tokens(engine, rids) -> int:
    """Output tokens SGLang's tokenizer manager has received so far for the running requests ``rids``
    (``tokenizer_manager.rid_to_state[rid].output_ids``). A request that does not stream reports every
    ``SGLANG_FORCE_STREAM_INTERVAL`` tokens (50 by default), so this counts in such steps."""
    sglang_version()
    states = getattr(engine.tokenizer_manager, "rid_to_state", None)
    if states is None:
        raise RuntimeError("SGLang's TokenizerManager has no rid_to_state: update "
                           "verl_efficientrollout.sglang_backend.compat.received_output_tokens for this version")
    return sum(len(getattr(states.get(rid), "output_ids", None) or ()) for rid in list(rids))  # any thread
