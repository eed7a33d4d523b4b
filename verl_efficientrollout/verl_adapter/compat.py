"""The verl internals the vLLM rollout subclasses, one function each, behind the verl version check
(``registry.check_verl_version``). verl's vLLM rollout imports vLLM: call these only where vLLM is
installed (the vLLM server's process, its workers, the trainer's rollout workers)."""

from __future__ import annotations

from verl_efficientrollout.verl_adapter.registry import check_verl_version


def _import(module: str, name: str):
    version = check_verl_version()
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(f"verl {version} has no {module}.{name}, which rollout.name=efficient with engine vllm "
                           f"subclasses: install verl==0.9.1 ({type(exc).__name__}: {exc})") from None


def vllm_http_server_class():
    """verl's ``vLLMHttpServer`` (its vLLM server, hooks ``_preprocess_engine_kwargs`` etc.)."""
    return _import("verl.workers.rollout.vllm_rollout.vllm_async_server", "vLLMHttpServer")


def vllm_replica_class():
    """verl's ``vLLMReplica`` (one ``vLLMHttpServer`` per node; ``server_class``, ``_get_server_name_prefix``)."""
    return _import("verl.workers.rollout.vllm_rollout.vllm_async_server", "vLLMReplica")


def vllm_server_adapter_class():
    """verl's worker-side ``ServerAdapter`` (bucketed weight sync over CUDA IPC or shared memory)."""
    return _import("verl.workers.rollout.vllm_rollout.vllm_rollout", "ServerAdapter")


def colocate_worker_extension_class():
    """verl's ``vLLMColocateWorkerExtension`` (the vLLM worker side of the weight sync)."""
    return _import("verl.workers.rollout.vllm_rollout.utils", "vLLMColocateWorkerExtension")


def token_output_class():
    """verl's ``TokenOutput`` (what a rollout server's ``generate`` returns)."""
    return _import("verl.workers.rollout.replica", "TokenOutput")
