"""Decode-step forwards at static shapes: CUDA graphs on a GPU, the same padding path testable on a CPU.

Eager PyTorch on a GPU is launch-bound for small batches: a one-token step of a 30-layer model
launches a few hundred kernels, and their launch time, not the weights' bandwidth, sets the step
time. vLLM and gpt-fast capture the decode step once per batch-size bucket and replay it. This
module does the same for the native engine's three decode-step forwards (the target's one-token
step, the drafter's step, the verify over gamma + 1 tokens):

* the active rows (kept by the engine in the cache's first slots) are padded up to a batch bucket
  (1, 2, 4, 8, ..., powers of two); padded rows decode token 0 at position 0 of a free slot;
* the keys attended are padded up to a key bucket (a power of two, at least 256, at most the cache's
  length), with the causal mask computed on the device from the positions;
* one graph per (module, batch bucket, tokens per row, key bucket), captured on first use into one
  shared memory pool, replayed with the inputs copied into its static buffers.

Modes (``NativeEngineConfig.decode_graphs``): ``off``, eager at exact shapes (the CPU path);
``padded``, eager through this module's buckets and padding (what the CPU tests run: the logic the
graphs depend on, without a GPU); ``on``, captured CUDA graphs. A capture that fails (out of
memory, an op that cannot be captured) falls back to eager with one warning.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

MIN_KEY_BUCKET = 256


def batch_bucket(batch: int) -> int:
    """The smallest power of two >= ``batch`` (1, 2, 4, 8, 16, ...)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return 1 << (batch - 1).bit_length()


def key_bucket(keys: int, max_len: int) -> int:
    """Keys attended, padded to a power of two >= ``MIN_KEY_BUCKET``, capped at the cache length."""
    if not 1 <= keys <= max_len:
        raise ValueError(f"keys must be in [1, {max_len}] (the KV cache's length), got {keys}")
    return min(max(MIN_KEY_BUCKET, 1 << (keys - 1).bit_length()), max_len)


class _Graph:
    """One captured forward and its static input/output buffers."""

    def __init__(self, graph, tokens: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor) -> None:
        self.graph, self.tokens, self.positions, self.logits = graph, tokens, positions, logits


class StepRunner:
    """Runs decode-step forwards of the target or the drafter over the engine's contiguous slots."""

    def __init__(self, mode: str, device: torch.device | str) -> None:
        if mode not in ("off", "padded", "on"):
            raise ValueError(f"StepRunner mode must be one of off, padded, on, got {mode!r}")
        if mode == "on" and torch.device(device).type != "cuda":
            raise ValueError(f"decode_graphs='on' needs a CUDA device, got {device!r} (use off or padded)")
        self.mode = mode
        self.device = torch.device(device)
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None
        self._eager: set[int] = set()  # modules whose capture failed: eager from then on
        self._warned = False
        self.captures = 0  # graphs captured since the engine started

    def reset(self) -> None:
        """Forget every graph: after a weight update or a new KV cache their addresses are stale."""
        self._graphs.clear()
        self._eager.clear()
        self._pool = None

    def slots_needed(self, rows: int) -> int:
        """KV-cache slots a rollout of ``rows`` rows needs (padded rows use free slots)."""
        return rows if self.mode == "off" else batch_bucket(rows)

    def __call__(
        self,
        model: nn.Module,  # DecoderLM or its drafter view
        tokens: torch.Tensor,  # [batch, tokens] int64
        positions: torch.Tensor,  # [batch, tokens] int64
        keys: int,  # > every position (known on the host)
        cache,  # KVCache whose slots 0..batch-1 hold these rows
    ) -> torch.Tensor:  # [batch, tokens, vocab] float32
        batch, width = tokens.shape
        if self.mode == "off" or id(model) in self._eager:
            return model(tokens, positions, cache, slice(0, batch), keys=keys)
        bucket, padded_keys = batch_bucket(batch), key_bucket(keys, cache.max_len)
        if bucket > cache.k.shape[1]:
            raise ValueError(f"the KV cache has {cache.k.shape[1]} slots, a batch of {batch} pads to {bucket}: "
                             "allocate slots_needed(rows)")
        if self.mode == "padded":
            padded_tokens, padded_positions = _pad(tokens, bucket), _pad(positions, bucket)
            return model(padded_tokens, padded_positions, cache, slice(0, bucket), keys=padded_keys)[:batch]
        key = (id(model), bucket, width, padded_keys)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(model, bucket, width, padded_keys, cache, tokens, positions)
            if graph is None:  # capture failed: this module runs eagerly (warned once)
                return model(tokens, positions, cache, slice(0, batch), keys=keys)
            self._graphs[key] = graph
        graph.tokens[:batch].copy_(tokens)
        graph.tokens[batch:].zero_()
        graph.positions[:batch].copy_(positions)
        graph.positions[batch:].zero_()
        graph.graph.replay()
        return graph.logits[:batch].clone()  # the next replay overwrites the static output

    def _capture(self, model, bucket, width, keys, cache, tokens, positions) -> _Graph | None:
        static_tokens = _pad(tokens, bucket).clone()
        static_positions = _pad(positions, bucket).clone()
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up off the capture (writes the same KV the replay will)
                for _ in range(2):
                    model(static_tokens, static_positions, cache, slice(0, bucket), keys=keys)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = model(static_tokens, static_positions, cache, slice(0, bucket), keys=keys)
            self._pool = graph.pool()
        except Exception as exc:  # out of memory, an op that cannot be captured: eager is always correct
            log = logger.debug if self._warned else logger.warning
            log("CUDA graph capture of %s failed (%s: %s); that module decodes eagerly until the next weight "
                "update", type(model).__name__, type(exc).__name__, exc)
            self._warned = True
            self._eager.add(id(model))
            if torch.cuda.is_available():
                torch.cuda.synchronize(self.device)
            return None
        self.captures += 1
        return _Graph(graph, static_tokens, static_positions, logits)


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:  # [batch, ...] -> [rows, ...], zeros below
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def resolve_mode(mode: str, device: torch.device | str) -> str:
    """``auto``: graphs on CUDA, eager at exact shapes on a CPU."""
    if mode != "auto":
        return mode
    return "on" if torch.device(device).type == "cuda" else "off"
