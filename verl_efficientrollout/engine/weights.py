"""All-or-nothing weight updates, shared by every engine: the whole set is gathered and checked
before any of it is loaded, so a bad or interrupted update leaves the previous weights serving."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterable

import torch

OPTIONAL = frozenset({"lm_head.weight"})  # tied-embedding models may or may not send it


def collect_weight_update(
    named_tensors: Iterable[tuple[str, Any]], shapes: dict[str, tuple[int, ...]],
) -> dict[str, torch.Tensor]:
    """The complete update as a dict, or ``ValueError`` naming what is wrong: a stream that fails
    half-way, missing or unknown names, a shape that differs from ``shapes`` (HF name -> shape of
    the serving checkpoint), a non-floating dtype, NaN or inf values."""
    try:
        state = dict(named_tensors)  # the whole set first: a stream that fails half-way changes nothing
    except Exception as exc:
        raise ValueError(f"weight update rejected: the weight stream failed after some tensors ({type(exc).__name__}: "
                         f"{exc}); the previous weights keep serving") from exc
    unknown = sorted(set(state) - set(shapes) - OPTIONAL)
    missing = sorted(set(shapes) - set(state))
    if unknown or missing:
        raise ValueError(f"weight update rejected: missing {missing[:3]} ({len(missing)}), "
                         f"unknown {unknown[:3]} ({len(unknown)}); the previous weights keep serving")
    for name, shape in shapes.items():
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"weight update rejected: {name} has dtype {kind}, expected a floating-point tensor "
                             f"(float32, bfloat16, float16); the previous weights keep serving")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"weight update rejected: {name} has shape {tuple(tensor.shape)}, "
                             f"expected {shape}; the previous weights keep serving")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"weight update rejected: {name} holds NaN or inf values; the previous weights "
                             "keep serving")
    return state


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor in a local safetensors checkpoint, read from the files'
    headers (no tensor is loaded). ``ValueError`` if the directory holds no safetensors file."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} holds no *.safetensors files: weight updates are checked against the "
                         "checkpoint's tensor names and shapes, so serve a local safetensors checkpoint")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        shapes.update({name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"})
    return shapes


def served_weight_shapes(model: str) -> tuple[dict[str, tuple[int, ...]], bool, int | None]:
    """(HF name -> shape of what a weight update must send, tied embeddings?, vocab size) for
    ``model`` (a local checkpoint): the checkpoint's tensors, less ``lm_head.weight`` when the
    embeddings are tied."""
    shapes = checkpoint_shapes(model)
    config_file = Path(model) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    tied = bool(config.get("tie_word_embeddings", False))
    if tied:
        shapes.pop("lm_head.weight", None)
    return shapes, tied, config.get("vocab_size")
