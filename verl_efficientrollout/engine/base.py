"""The engine interface every backend implements, and its request/result types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence

from verl_efficientrollout._validate import check_int
from verl_efficientrollout.config import SamplingParams

FINISH_REASONS = ("stop", "length", "error")


@dataclass(frozen=True)
class Request:
    """One generation: token ids in; sampled until EOS or ``max_new_tokens``."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    request_id: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", tuple(self.prompt_ids))
        if not self.prompt_ids:
            raise ValueError(f"Request.prompt_ids must be a non-empty sequence of token ids (request {self.request_id!r})")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.prompt_ids):
            raise ValueError(f"Request.prompt_ids must hold integers >= 0 (request {self.request_id!r})")
        check_int("Request", "max_new_tokens", self.max_new_tokens, low=1)
        if not isinstance(self.sampling, SamplingParams):
            raise ValueError(f"Request.sampling must be a SamplingParams, got {type(self.sampling).__name__}")


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS), "length" (max_new_tokens) or "error"
    error: str | None = None


@dataclass
class RolloutResult:
    outputs: list[RequestOutput]
    seconds: float
    # One entry per decode step: (active batch, speculated, gamma, seconds, accepted tokens).
    steps: list[tuple[int, bool, int, float, int]] = field(default_factory=list)
    controller: dict[str, Any] = field(default_factory=dict)  # ControllerStats.to_dict()
    prefill_seconds: float = 0.0
    # Draft tokens reached / accepted per draft position, summed over the rollout's steps.
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


class RolloutEngine(Protocol):
    """What the veRL adapter and the benchmark need from an engine."""

    weights_version: int

    def generate(self, requests: Sequence[Request], seed: int = 0) -> RolloutResult: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None: ...
