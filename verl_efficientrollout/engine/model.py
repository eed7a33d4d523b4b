"""A lean decoder-only LM (Llama family) with a slot-indexed static KV cache.

One forward serves every step of the native engine: plain decoding (one token per row), the
drafter's steps and the target's verify (gamma + 1 tokens per row). Rows carry their own
positions and KV-cache slot, and a rejected draft is rolled back by position alone: keys at
positions a row has not committed are never attended (causal mask on absolute positions) and get
overwritten by the next write. The engine keeps its active rows in the first slots of the cache
(``slots=slice(0, batch)``), so attention reads each layer's KV as a view; a tensor of slots
(prefill, any other caller) gathers them instead. On a CPU in float32 a decode step over such a
slice (one token per row, or a verify of at most ``MAX_DECODE_OPS_QUERY_ROWS`` query rows in all)
runs four compiled ops per layer besides the GEMMs (``cpu_kernels``: norms, RoPE + KV write +
attention, SiLU-multiply); every other forward, and a machine where they cannot be built, runs the
PyTorch ops of ``Block.forward``.

The drafter is ``build_drafter(model, ...)`` of this module: same class, same cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from verl_efficientrollout.engine import cpu_kernels

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")  # transformers' config.model_type
# A CPU float32 step over contiguous slots runs the compiled decode ops when it has one token per row
# (plain decoding, the drafter's steps), or at most this many query rows in all (batch x tokens: a
# verify of gamma + 1 at a small batch). Larger verifies and prefill are compute-bound, where the ops'
# plain C++ attention loses to SDPA's GEMMs (verifies measured on the AVX2-only EPYC: faster up to 12
# query rows, equal at 20, slower from 28).
MAX_DECODE_OPS_QUERY_ROWS = 16


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    tie_word_embeddings: bool

    @classmethod
    def from_hf_config(cls, config) -> "ModelArgs":
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type must be one of {', '.join(SUPPORTED_MODEL_TYPES)} for the native engine, got {model_type!r}"
            )
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"model rope_type must be 'default' for the native engine, got {rope_type!r}")
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads, head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps, rope_theta=float(theta), qkv_bias=model_type == "qwen2",
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


class KVCache:
    """K and V for every layer: ``[num_layers, slots, kv_heads, max_len, head_dim]`` each."""

    def __init__(self, args: ModelArgs, slots: int, max_len: int, dtype: torch.dtype, device="cpu") -> None:
        shape = (args.num_layers, slots, args.num_kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


_PACK_BATCH_HINT = 16  # rows oneDNN lays packed weights out for (any batch runs; decode batches are small)
_PACKED_MAX_ROWS = 64  # more rows (prefill, large batches): aten's linear, compute-bound and fine there


def packed_rows(rows: int) -> int:
    """Rows a packed linear runs for ``rows`` input rows: 1, 2, 4, 8, 16, then multiples of 16.

    oneDNN compiles and caches a kernel per input shape (about 0.6 MB each, measured): padding the
    rows to these few buckets bounds that cache (8 shapes per linear) where exact row counts grew
    it by 100 MB in the soak test. Padding a few rows costs nothing in this bandwidth-bound regime."""
    if rows <= 16:
        return 1 << (rows - 1).bit_length()
    return -(-rows // 16) * 16


def onednn_linear_ops():
    """torch's oneDNN linear ops, ``(reorder_linear_weight, linear_pointwise)``, or None where this
    torch lacks them. They are internal to torch (``torch.ops.mkldnn``, what inductor's CPU freezing
    packs weights with): this is the one place that names them."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


class Linear(nn.Linear):
    """``nn.Linear`` that can run on a CPU from a oneDNN pre-packed copy of its weight (``pack``).

    Decode's GEMMs have few rows; for those, oneDNN's blocked weight layout runs the default model's
    steps 1.3x (1 row) to 1.7x (4 rows) faster than aten's fp32 linear on the AVX2-only EPYC
    (measured). Rows are padded to ``packed_rows`` buckets; above 64 rows aten runs. The packed copy
    serves only while ``weight`` is the very tensor it was packed from: a replaced weight (a weight
    update, torchao's quantized drafter weight in a shallow clone) runs ``F.linear`` again. Weights
    of this model are replaced, never modified in place."""

    _packed: tuple | None = None  # (source weight, packed weight, oneDNN linear op)

    def pack(self) -> bool:
        """Pack the current weight (CPU, float32 or bfloat16); False where that is not possible."""
        ops = onednn_linear_ops()
        weight = self.weight
        self._packed = None
        if ops is None or weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
            return False
        try:
            self._packed = (weight, ops[0](weight.detach(), _PACK_BATCH_HINT), ops[1])
        except RuntimeError:  # no oneDNN kernel for this dtype on this CPU: aten's linear
            return False
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        packed = self._packed
        rows = x.numel() // x.shape[-1]
        if packed is None or packed[0] is not self.weight or not 0 < rows <= _PACKED_MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        flat, padded = x.reshape(rows, x.shape[-1]), packed_rows(rows)
        if padded != rows:
            flat = F.pad(flat, (0, 0, 0, padded - rows))
        out = packed[2](flat, packed[1], self.bias, "none", [], "")[:rows]
        return out.view(*x.shape[:-1], out.shape[-1])


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.args, self.layer = args, layer
        qkv_out = (args.num_heads + 2 * args.num_kv_heads) * args.head_dim
        self.attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.wqkv = Linear(args.hidden_size, qkv_out, bias=args.qkv_bias)
        self.wo = Linear(args.num_heads * args.head_dim, args.hidden_size, bias=False)
        self.mlp_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.w13 = Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)  # gate, up
        self.w2 = Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # [batch, tokens, hidden]
        cos: torch.Tensor,  # [batch, 1, tokens, head_dim]
        sin: torch.Tensor,  # [batch, 1, tokens, head_dim]
        cache: KVCache,
        slots: torch.Tensor | slice,  # [batch] int64, or slice(first, first + batch): contiguous slots
        positions: torch.Tensor,  # [batch, tokens] int64
        mask: torch.Tensor | None,  # [batch, 1, tokens, keys] bool (None with decode_ops)
        decode_ops=None,  # cpu_kernels.decode_ops(), for a float32 decode step over a slice of slots
    ) -> torch.Tensor:
        a = self.args
        batch, tokens, _ = x.shape
        if decode_ops is not None:  # the same computation as below, in four compiled ops and the GEMMs
            out = decode_ops.decode_attention(  # RoPE, the KV write and attention: [batch, tokens, heads * dim]
                self.wqkv(decode_ops.rms_norm(x, self.attn_norm.weight, self.attn_norm.eps)), cos, sin,
                cache.k[self.layer, slots], cache.v[self.layer, slots], positions, a.num_heads, a.num_kv_heads,
                a.head_dim**-0.5)
            x, normed = decode_ops.add_rms_norm(x, self.wo(out), self.mlp_norm.weight, self.mlp_norm.eps)
            return x + self.w2(decode_ops.silu_mul(self.w13(normed)))
        qkv = self.wqkv(self.attn_norm(x)).view(batch, tokens, a.num_heads + 2 * a.num_kv_heads, a.head_dim)
        qk, v = qkv.transpose(1, 2).split([a.num_heads + a.num_kv_heads, a.num_kv_heads], dim=1)
        q, k = _rope(qk, cos, sin).split([a.num_heads, a.num_kv_heads], dim=1)  # one rotation for q and k
        keys = mask.shape[-1]
        if isinstance(slots, slice):
            rows = torch.arange(slots.start, slots.stop, device=x.device)[:, None]
        else:
            rows = slots[:, None]  # with positions [batch, tokens]: writes [batch, tokens, kv, dim]
        cache.k[self.layer][rows, :, positions] = k.transpose(1, 2).to(cache.k.dtype)
        cache.v[self.layer][rows, :, positions] = v.transpose(1, 2).to(cache.v.dtype)
        # [batch, kv, keys, dim]: a view for a slice of slots (no copy), a gather for a tensor of them
        k_all = cache.k[self.layer, slots, :, :keys].to(q.dtype)
        v_all = cache.v[self.layer, slots, :, :keys].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=a.num_kv_heads != a.num_heads)
        x = x + self.wo(out.transpose(1, 2).reshape(batch, tokens, a.num_heads * a.head_dim))
        gate, up = self.w13(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderLM(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.pack_cpu_linears = False  # set by from_hf: (re)pack every Linear whenever weights load
        self.decode_ops = None  # set by from_hf: cpu_kernels.decode_ops(), for decode steps
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", _inv_freq(args), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(
        self,
        tokens: torch.Tensor,  # [batch, tokens] int64
        positions: torch.Tensor,  # [batch, tokens] int64, absolute positions of those tokens
        cache: KVCache,
        slots: torch.Tensor | slice,  # [batch] int64, each row's KV-cache slot; or a slice of contiguous slots
        output_index: torch.Tensor | None = None,  # [batch] int64: logits of that token only
        keys: int | None = None,  # keys attended per row: > every position (None: read from positions)
    ) -> torch.Tensor:  # [batch, tokens, vocab] float32, or [batch, 1, vocab] with output_index
        """Writes the tokens' K/V at their positions, attends causally over each row's slot.

        Pass ``keys`` (known on the host) to keep the forward free of host synchronisation and its
        shapes static (CUDA graphs); keys past a row's positions are masked."""
        x = self.embed_tokens(tokens)
        angles = positions[..., None].float() * self.inv_freq  # [batch, tokens, head_dim / 2]
        angles = torch.cat((angles, angles), dim=-1)[:, None]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        ops = self.decode_ops
        small = tokens.shape[1] == 1 or tokens.numel() <= MAX_DECODE_OPS_QUERY_ROWS
        if ops is not None and not (small and isinstance(slots, slice) and x.dtype == cache.k.dtype == torch.float32
                                    and x.device.type == "cpu"):
            ops = None  # prefill, a large verify, gathered slots, another dtype or device: the PyTorch ops
        mask = None  # the ops bound each query's keys by its position themselves
        if ops is None:
            if keys is None:
                keys = int(positions.max()) + 1
            mask = (torch.arange(keys, device=tokens.device) <= positions[..., None])[:, None]  # [batch, 1, tokens, keys]
        for layer in self.layers:
            x = layer(x, cos, sin, cache, slots, positions, mask, ops)
        if output_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), output_index][:, None]
        return self.lm_head(self.norm(x)).float()

    @classmethod
    def from_hf(cls, hf_model: nn.Module, dtype: torch.dtype | None = None, device=None,
                pack_cpu_linears: bool = False, cpu_decode_ops: bool = False) -> "DecoderLM":
        """Build from a loaded transformers model (weights fused: qkv, gate/up); by default in
        the model's own dtype and device. ``pack_cpu_linears``: on a CPU, every linear also keeps a
        oneDNN pre-packed copy of its weight (faster decode, a second copy of the weights).
        ``cpu_decode_ops``: on a CPU in float32, decode steps over a slice of slots run their
        norms, RoPE + KV write + attention and SiLU-multiply as compiled ops (``cpu_kernels``;
        PyTorch's ops where they cannot be built)."""
        args = ModelArgs.from_hf_config(hf_model.config)
        param = next(hf_model.parameters())
        with torch.device("meta"):
            model = cls(args)
        model.pack_cpu_linears = pack_cpu_linears
        device = torch.device(device or param.device)
        if cpu_decode_ops and device.type == "cpu" and (dtype or param.dtype) == torch.float32:
            model.decode_ops = cpu_kernels.decode_ops()  # None (warned) where they cannot be built
        model.load_hf_state_dict(hf_model.state_dict(), dtype=dtype or param.dtype, device=device)
        return model.eval().requires_grad_(False)

    def load_hf_state_dict(self, state: dict[str, torch.Tensor], dtype: torch.dtype, device) -> None:
        """Replace every weight from HF-named tensors (fails before touching anything if incomplete)."""
        own = _fuse_hf_state_dict(self.args, state)
        expected = {n for n, _ in self.named_parameters(remove_duplicate=True)}
        missing = sorted(expected - set(own))
        if missing:
            raise ValueError(f"weights are missing {len(missing)} tensors, e.g. {missing[:3]}")
        for name, param in self.named_parameters(remove_duplicate=True):
            if tuple(own[name].shape) != tuple(param.shape):
                raise ValueError(f"weight {name} has shape {tuple(own[name].shape)}, expected {tuple(param.shape)}")
            if not own[name].is_floating_point():
                raise ValueError(f"weight {name} has dtype {own[name].dtype}, expected a floating-point tensor")
        for name, _ in list(self.named_parameters(remove_duplicate=True)):
            module_name, _, leaf = name.rpartition(".")
            module = self.get_submodule(module_name)
            setattr(module, leaf, nn.Parameter(own[name].to(device=device, dtype=dtype), requires_grad=False))
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.inv_freq = _inv_freq(self.args, device)
        if self.pack_cpu_linears:
            for module in self.modules():
                if isinstance(module, Linear):
                    module.pack()

    @property
    def packed_linears(self) -> int:
        """How many linears currently run from a oneDNN pre-packed weight."""
        return sum(1 for m in self.modules() if isinstance(m, Linear) and m._packed is not None
                   and m._packed[0] is m.weight)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under Hugging Face names (views, unfused): the inverse of ``load_hf_state_dict``."""
        a, state = self.args, {"model.embed_tokens.weight": self.embed_tokens.weight, "model.norm.weight": self.norm.weight}
        if not a.tie_word_embeddings:
            state["lm_head.weight"] = self.lm_head.weight
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            for name, tensor in zip("qkv", layer.wqkv.weight.split([q, kv, kv])):
                state[p + f"self_attn.{name}_proj.weight"] = tensor
            if a.qkv_bias:
                for name, tensor in zip("qkv", layer.wqkv.bias.split([q, kv, kv])):
                    state[p + f"self_attn.{name}_proj.bias"] = tensor
            gate, up = layer.w13.weight.chunk(2)
            state.update({p + "self_attn.o_proj.weight": layer.wo.weight, p + "mlp.gate_proj.weight": gate,
                          p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": layer.w2.weight,
                          p + "input_layernorm.weight": layer.attn_norm.weight,
                          p + "post_attention_layernorm.weight": layer.mlp_norm.weight})
        return state


def _inv_freq(args: ModelArgs, device=None) -> torch.Tensor:  # [head_dim / 2] rotary frequencies
    exponents = torch.arange(0, args.head_dim, 2, dtype=torch.float32, device=device) / args.head_dim
    return 1.0 / args.rope_theta**exponents


def _fuse_hf_state_dict(args: ModelArgs, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise ValueError(f"weights are missing {name!r}")
        return state[name]

    own = {"embed_tokens.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    if not args.tie_word_embeddings:
        own["lm_head.weight"] = get("lm_head.weight")
    for i in range(args.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        own[o + "wqkv.weight"] = torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        if args.qkv_bias:
            own[o + "wqkv.bias"] = torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
        own[o + "wo.weight"] = get(p + "self_attn.o_proj.weight")
        own[o + "w13.weight"] = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
        own[o + "w2.weight"] = get(p + "mlp.down_proj.weight")
        own[o + "attn_norm.weight"] = get(p + "input_layernorm.weight")
        own[o + "mlp_norm.weight"] = get(p + "post_attention_layernorm.weight")
    return own
