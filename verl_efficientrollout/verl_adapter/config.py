"""veRL's ``RolloutConfig`` -> our frozen settings, once, at the boundary.

Our keys live under ``actor_rollout_ref.rollout.custom.efficient`` (veRL documents ``custom`` as
the rollout's extension point; ``engine_kwargs`` is keyed by backend and parsed by verl's own
vLLM/SGLang servers). Anything wrong fails here, naming the field.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from verl_efficientrollout._validate import check_float, check_int
from verl_efficientrollout.config import EfficientRolloutConfig
from verl_efficientrollout.verl_adapter.registry import ROLLOUT_NAME

logger = logging.getLogger(__name__)

CUSTOM_KEY = "efficient"  # actor_rollout_ref.rollout.custom.efficient
FIELD = f"actor_rollout_ref.rollout.custom.{CUSTOM_KEY}"


@dataclass(frozen=True)
class ServerSettings:
    """Everything one rollout server needs, taken from veRL's rollout and model configs."""

    model_path: str
    efficient: EfficientRolloutConfig
    prompt_length: int = 512
    response_length: int = 512
    max_num_seqs: int = 1024
    seed: int = 42
    batch_window_s: float = 0.02  # requests arriving this close together decode as one batch

    def __post_init__(self) -> None:
        check_int("ServerSettings", "prompt_length", self.prompt_length, low=1)
        check_int("ServerSettings", "response_length", self.response_length, low=1)
        check_int("ServerSettings", "max_num_seqs", self.max_num_seqs, low=1)
        check_float("ServerSettings", "batch_window_s", self.batch_window_s, low=0.0)

    @property
    def max_model_len(self) -> int:
        engines = {"vllm": self.efficient.vllm, "sglang": self.efficient.sglang}
        return engines.get(self.efficient.engine, self.efficient.native).max_model_len


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (verl hands either)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with verl
        pass
    return value


def efficient_config(rollout_config) -> EfficientRolloutConfig:
    """Parse ``custom.efficient`` of a veRL ``RolloutConfig`` (or its OmegaConf node)."""
    name = rollout_config.name
    if name != ROLLOUT_NAME:
        raise ValueError(f"actor_rollout_ref.rollout.name must be {ROLLOUT_NAME!r} for this adapter, got {name!r}")
    custom = _plain(rollout_config.custom) or {}
    if not isinstance(custom, dict):
        raise ValueError(f"actor_rollout_ref.rollout.custom must be a mapping, got {type(custom).__name__}")
    section = _plain(custom.get(CUSTOM_KEY)) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{FIELD} must be a mapping, got {type(section).__name__}")
    section = dict(section)
    max_model_len = rollout_config.max_model_len or rollout_config.prompt_length + rollout_config.response_length
    # verl's rollout settings unless ours say otherwise
    native = dict(section.get("native") or {})
    native.setdefault("dtype", rollout_config.dtype)
    native.setdefault("device", "auto")
    native.setdefault("max_model_len", max_model_len)
    section["native"] = native
    for engine, memory_key in (("vllm", "gpu_memory_utilization"), ("sglang", "mem_fraction_static")):
        settings = dict(section.get(engine) or {})
        settings.setdefault("dtype", rollout_config.dtype)
        settings.setdefault("max_model_len", max_model_len)
        settings.setdefault("max_num_seqs", rollout_config.max_num_seqs)
        settings.setdefault(memory_key, rollout_config.gpu_memory_utilization)
        section[engine] = settings
    try:
        config = EfficientRolloutConfig.from_dict(section)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{FIELD}: {exc}") from exc
    tp = rollout_config.tensor_model_parallel_size
    if tp != 1 and config.engine != "vllm":  # verl's own vLLM server runs TP
        logger.warning("engine %s serves each replica on one device; the other %d device(s) of each replica "
                       "(actor_rollout_ref.rollout.tensor_model_parallel_size=%d) stay idle: set it to 1",
                       config.engine, tp - 1, tp)
    return config


def server_settings(rollout_config, model_path: str) -> ServerSettings:
    config = efficient_config(rollout_config)
    return ServerSettings(
        model_path=model_path, efficient=config, prompt_length=rollout_config.prompt_length,
        response_length=rollout_config.response_length, max_num_seqs=rollout_config.max_num_seqs,
        seed=rollout_config.seed,
    )

