"""The engine interface every backend implements, and its request/result types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

from verl_efficientrollout._validate import check_int
from verl_efficientrollout.config import SamplingParams

FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass(frozen=True)
class Request:
    """One generation: token ids in; sampled until EOS or ``max_new_tokens``."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    request_id: str = ""
    logprobs: bool = False  # also return each generated token's log-prob under the target

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
    finish_reason: str  # "stop" (EOS), "length" (max_new_tokens), "abort" or "error"
    error: str | None = None
    log_probs: list[float] | None = None  # when the request asked: log-softmax(logits / T) per token
    # Speculation of this request: draft tokens proposed, accepted, and verify steps that had drafts.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_verify_steps: int = 0


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
        return sum(len(o.token_ids) for o in self.outputs if o is not None)

    def summary(self) -> dict[str, Any]:
        """What the benchmark and the veRL metrics report of one rollout."""
        steps, drafted, accepted = self.steps, self.drafted_per_position, self.accepted_per_position
        draft_rows = drafted[0] if drafted else 0
        histogram: dict[int, int] = {}
        for _, _, gamma, _, _ in steps:
            histogram[gamma] = histogram.get(gamma, 0) + 1
        return {
            "seconds": self.seconds,
            "prefill_seconds": self.prefill_seconds,
            "tokens": self.generated_tokens,
            "tokens_per_second": self.generated_tokens / self.seconds if self.seconds else 0.0,
            "steps": len(steps),
            "speculated_share": sum(1 for s in steps if s[1]) / len(steps) if steps else None,
            "drafted_tokens": sum(o.num_draft_tokens for o in self.outputs if o is not None),
            "accepted_tokens": sum(accepted),
            "rejected_tokens": sum(drafted) - sum(accepted),
            "token_acceptance": sum(accepted) / sum(drafted) if sum(drafted) else None,
            "acceptance_per_position": [a / d if d else None for a, d in zip(accepted, drafted)],
            "mean_acceptance_length": (sum(accepted) + draft_rows) / draft_rows if draft_rows else None,
            "gamma_histogram": dict(sorted(histogram.items())),
        }


def triage(
    requests: Sequence[Request], check_request: Callable[[Request], str | None]
) -> tuple[list[RequestOutput | None], list[int]]:
    """Error outputs for the requests ``check_request`` refuses, and the indices of the rest.
    An empty batch is an error of the caller."""
    if not requests:
        raise ValueError("generate needs at least one Request, got an empty list")
    outputs: list[RequestOutput | None] = [None] * len(requests)
    valid = []
    for i, request in enumerate(requests):
        error = check_request(request)
        if error:
            outputs[i] = RequestOutput(request.request_id, [], "error", error)
        else:
            valid.append(i)
    return outputs, valid


def context_error(request: Request, max_model_len: int) -> str | None:
    if len(request.prompt_ids) + request.max_new_tokens > max_model_len:
        return (f"prompt of {len(request.prompt_ids)} tokens + max_new_tokens {request.max_new_tokens} "
                f"exceeds max_model_len {max_model_len}")
    return None


def prompt_error(request: Request, max_model_len: int, vocab_size: int | None) -> str | None:
    """Why an engine of this context length and vocabulary cannot serve ``request`` (None if it can)."""
    error = context_error(request, max_model_len)
    if error is None and vocab_size and max(request.prompt_ids) >= vocab_size:
        error = f"prompt token id {max(request.prompt_ids)} >= vocab size {vocab_size}"
    return error


def add_into(totals: list[int], values: Sequence[int]) -> None:
    """Element-wise ``totals += values``, growing ``totals`` as needed (per-position counts)."""
    totals.extend([0] * (len(values) - len(totals)))
    for i, value in enumerate(values):
        totals[i] += value


class RolloutEngine(Protocol):
    """What the veRL adapter and the benchmark need from an engine."""

    weights_version: int
    drafter_recipe: str | None  # None: this engine decodes plain (no drafter, or it failed)
    drafter_build_seconds: float | None  # of the last drafter build or refresh

    def check_request(self, request: Request) -> str | None: ...

    def generate(
        self, requests: Sequence[Request], seed: int = 0, controller: Any = None,
        should_abort: Callable[[], bool] | None = None,
    ) -> RolloutResult: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """All or nothing: a bad set raises ``ValueError`` and the previous weights keep serving."""

    def release_kv_cache(self) -> None: ...
