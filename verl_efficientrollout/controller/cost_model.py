"""Roofline step-cost model: how long one target, draft or verify forward takes.

A decode step streams the weights once and every active row's KV cache, and does the matmuls
for its new tokens; it takes the longer of the two, plus fixed overheads::

    seconds = max(bytes / bandwidth, flops / flops_rate) + overhead_s + row_overhead_s * batch
    bytes   = weight_bytes + total_context * kv_bytes_per_token
    flops   = batch * new_tokens * flops_per_token + new_tokens * total_context * attn_flops

``total_context`` is the sum of the context lengths of the active rows. Speculating with draft
length gamma costs gamma draft forwards plus one verify forward (the target with gamma + 1 new
tokens per row) and yields E[accepted + 1] tokens per row, so with r = draft / target and
v = verify / target step time the predicted per-step speedup over plain decoding is::

    predicted_speedup = expected_output_tokens(acceptance, gamma) / (gamma * r + v)

An engine that times a speculative step only as a whole (vLLM: drafting and verifying happen in
one engine step) reports it as kind ``step``: its time is gamma draft forwards plus the verify,
so it fits (``fit_profile``) and corrects (``CostModel.observe_step``) the draft and verify
costs together, against the plain step it is compared with.

A profile's ``structure`` says how forwards make up a step. ``native``: a plain step is one
target forward; a speculative step is gamma drafter forwards and one verify (our engine, which
reads the target's KV). ``draft-model``: vLLM's draft_model method, whose drafter keeps a KV cache
of its own: every step also runs the drafter over the step's tokens (two per row at K = 0, gamma
+ 1 after a verify), then gamma - 1 more one-token drafter forwards. So with T(n), D(n) the
forwards over n new tokens per row: plain = T(1) + D(2), speculative = T(g + 1) + D(g + 1) +
(g - 1) D(1), and the cost model's (target, draft, verify) are T(1) + D(2), D(1) and
T(g + 1) + D(g + 1) - D(1), so that gamma * draft + verify is the whole step.

A ``CostProfile`` holds the constants for one model on one device (fitted by
``efficient-rollout calibrate`` or bundled in ``profiles/``); ``CostModel`` adds online
correction factors learned from measured step times.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

from verl_efficientrollout._validate import check_choice, check_float, check_int, fail

KINDS = ("target", "draft", "verify")


@dataclass(frozen=True)
class StepCost:
    """Roofline constants for one kind of forward (target or draft); see the module docstring."""

    weight_bytes: float  # bytes streamed once per step
    kv_bytes_per_token: float  # KV bytes read per context token per row
    flops_per_token: float  # matmul FLOPs per new token
    attn_flops_per_context_token: float  # attention FLOPs per new token per context token
    bandwidth: float  # bytes / s
    flops_rate: float  # FLOP / s
    overhead_s: float = 0.0  # fixed per step
    row_overhead_s: float = 0.0  # per active row per step

    def __post_init__(self) -> None:
        for name in ("weight_bytes", "kv_bytes_per_token", "flops_per_token", "attn_flops_per_context_token",
                     "overhead_s", "row_overhead_s"):
            check_float("StepCost", name, getattr(self, name), low=0.0)
        for name in ("bandwidth", "flops_rate"):
            check_float("StepCost", name, getattr(self, name), low=0.0, low_open=True)

    def time(self, batch: int, total_context: int, new_tokens_per_row: int = 1) -> float:
        """Seconds for one forward of ``batch`` rows adding ``new_tokens_per_row`` tokens each."""
        nbytes = self.weight_bytes + total_context * self.kv_bytes_per_token
        flops = new_tokens_per_row * (batch * self.flops_per_token + total_context * self.attn_flops_per_context_token)
        return max(nbytes / self.bandwidth, flops / self.flops_rate) + self.overhead_s + self.row_overhead_s * batch


STRUCTURES = ("native", "draft-model")


@dataclass(frozen=True)
class CostProfile:
    """Step costs of one target model and its drafter on one device (``structure``: how those
    forwards make up an engine's steps, see the module docstring)."""

    name: str
    device: str
    target: StepCost
    draft: StepCost
    notes: str = ""
    structure: str = "native"

    def __post_init__(self) -> None:
        check_choice("CostProfile", "structure", self.structure, STRUCTURES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CostProfile":
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"CostProfile got unknown keys {unknown}; allowed keys: {', '.join(allowed)}")
        steps = {k: StepCost(**d[k]) if isinstance(d.get(k), Mapping) else d.get(k) for k in ("target", "draft")}
        for k, v in steps.items():
            if not isinstance(v, StepCost):
                fail("CostProfile", k, "a mapping of StepCost fields", v)
        return cls(**{**dict(d), **steps})


def bundled_profiles() -> tuple[str, ...]:
    """Names of the profiles shipped in ``controller/profiles/``."""
    folder = resources.files(__package__).joinpath("profiles")
    return tuple(sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json")))


# What ``ControllerConfig.profile = "auto"`` means for each engine: its step costs measured on this
# project's 2-core CPU with the default model (``efficient-rollout calibrate [--engine vllm]``).
DEFAULT_PROFILES = {"native": "cpu-smollm2-135m-fp32", "vllm": "cpu-smollm2-135m-vllm-bf16"}


def resolve_profile(name_or_path: str | Path, engine: str = "native") -> str | Path:
    """``auto`` -> the bundled default profile of ``engine``; anything else unchanged."""
    if str(name_or_path) != "auto":
        return name_or_path
    if engine not in DEFAULT_PROFILES:
        raise ValueError(f"no default cost profile for engine {engine!r}: the engines with one are "
                         f"{', '.join(DEFAULT_PROFILES)}; set controller.profile to a calibrated JSON")
    return DEFAULT_PROFILES[engine]


def load_profile(name_or_path: str | Path, engine: str = "native") -> CostProfile:
    """Load a bundled profile by name, or any profile JSON by path; ``auto`` is the bundled
    default of ``engine`` (``DEFAULT_PROFILES``)."""
    name_or_path = resolve_profile(name_or_path, engine)
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        return CostProfile.from_dict(json.loads(path.read_text()))
    if str(name_or_path) not in bundled_profiles():
        raise ValueError(
            f"unknown cost profile {str(name_or_path)!r}: not a file, and the bundled profiles are "
            f"{', '.join(bundled_profiles())}; run `efficient-rollout calibrate` to make one"
        )
    text = resources.files(__package__).joinpath("profiles").joinpath(f"{name_or_path}.json").read_text()
    return CostProfile.from_dict(json.loads(text))


def save_profile(profile: CostProfile, path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile.to_dict(), indent=2) + "\n")


def fit_profile(measurements: Sequence[Mapping[str, Any]], base: CostProfile, name: str, device: str,
                structure: str | None = None) -> CostProfile:
    """Fit bandwidth, FLOP rate and fixed overhead of the target and the draft StepCost to
    measured step times, keeping ``base``'s byte and FLOP counts (what the model is) and
    refitting what the device does.

    ``measurements``: dicts with ``kind``, ``batch``, ``total_context``, ``gamma`` and
    ``seconds``. Kinds: ``target`` (a plain step), ``draft`` (one drafter forward), ``verify``
    (the target over gamma + 1 new tokens per row) and ``step`` (a whole speculative step, timed
    as one). Native measurements (no ``step``) fit each StepCost to its own forwards. Whole-step
    measurements (vLLM) hold target and drafter forwards as ``structure`` says (default
    ``draft-model``; ``native`` for vLLM with our self-drafter, whose plain step is the target
    alone and whose speculative step is gamma drafter forwards and the verify): the two StepCosts
    are fitted in turn, each with the other's prediction held fixed, over a few rounds. A coarse
    log-space grid search minimising the squared log error: a few hundred thousand cheap
    evaluations per fit.
    """
    whole_steps = any(m["kind"] == "step" for m in measurements)
    structure = structure or ("draft-model" if whole_steps else "native")
    check_choice("fit_profile", "structure", structure, STRUCTURES)
    if not whole_steps:
        def points(kinds: tuple[str, ...]) -> list[_Point]:
            return [(m["batch"], m["total_context"], ((1, m["gamma"] + 1 if m["kind"] == "verify" else 1),),
                     m["seconds"], 0.0) for m in measurements if m["kind"] in kinds]

        target = _fit_step_cost(base.target, points(("target", "verify")))
        draft = _fit_step_cost(base.draft, points(("draft",)))
        structure = "native"
    else:
        def split(m: Mapping[str, Any]) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
            """(target forwards, drafter forwards) of one vLLM step, as (count, new tokens per row)."""
            g = m["gamma"] if m["kind"] == "step" else 0
            if structure == "native":  # the self-drafter: nothing at K = 0, else g one-token forwards
                return ((1, g + 1),), (((g, 1),) if g else ())
            drafter = ((1, max(g + 1, 2)),) + (((g - 1, 1),) if g > 1 else ())
            return ((1, g + 1),), drafter

        def given(cost: StepCost, m, terms) -> float:
            return sum(n * cost.time(m["batch"], m["total_context"], t) for n, t in terms)

        steps = [m for m in measurements if m["kind"] in ("target", "step")]
        target, draft = base.target, base.draft
        plain = [m for m in steps if m["kind"] == "target"]
        if structure == "native" and len(plain) >= 3:  # plain steps are the target alone: start from them
            target = _fit_step_cost(base.target, [(m["batch"], m["total_context"], ((1, 1),), m["seconds"], 0.0)
                                                  for m in plain])
            draft = _fit_step_cost(base.draft, [(m["batch"], m["total_context"], split(m)[1], m["seconds"],
                                                 given(target, m, split(m)[0])) for m in steps if split(m)[1]])
        for _ in range(4):
            target = _fit_step_cost(base.target, [(m["batch"], m["total_context"], split(m)[0], m["seconds"],
                                                   given(draft, m, split(m)[1])) for m in steps])
            draft = _fit_step_cost(base.draft, [(m["batch"], m["total_context"], split(m)[1], m["seconds"],
                                                 given(target, m, split(m)[0])) for m in steps if split(m)[1]])
    notes = f"fitted to {len(measurements)} measured step times on this device from {base.name}'s model counts"
    return CostProfile(name=name, device=device, target=target, draft=draft, notes=notes, structure=structure)


# (batch, total_context, ((count, new tokens per row), ...), seconds, known seconds)
_Point = tuple[int, int, tuple[tuple[int, int], ...], float, float]


def _fit_step_cost(base: StepCost, points: list[_Point]) -> StepCost:
    """Fit one StepCost: each point's seconds are ``count`` forwards of it over so many new tokens
    per row, for each of its terms, plus ``known`` seconds of other work."""
    if len(points) < 3:
        raise ValueError(f"fit_profile needs at least 3 measured step times per kind, got {len(points)}")

    def make(overhead: float, memory: float, rate: float) -> StepCost:  # memory: seconds per weight pass
        bandwidth = base.weight_bytes / memory if base.weight_bytes else base.bandwidth
        return dataclasses.replace(base, bandwidth=bandwidth, flops_rate=rate, overhead_s=overhead, row_overhead_s=0.0)

    def error(params: tuple[float, float, float]) -> float:
        candidate = make(*params)
        return sum(math.log(max(sum(n * candidate.time(b, c, t) for n, t in terms) + known, 1e-9) / s) ** 2
                   for b, c, terms, s, known in points)

    fastest = min(max((s - known) / sum(n for n, _ in terms), 1e-3 * s) for _, _, terms, s, known in points)
    shares = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    coarse = [(fastest * o, fastest * m, 10 ** (r / 4)) for o in shares for m in shares[1:] + (0.95,)
              for r in range(28, 56)]  # FLOP rate 10^7 .. 10^13.75
    best = min(coarse, key=error)
    for _ in range(4):  # refine each parameter in turn around the best grid point
        for i in range(3):
            tries = [best[:i] + (best[i] * 2 ** (k / 8),) + best[i + 1 :] for k in range(-4, 5)]
            if best[i] == 0.0:
                tries.append(best[:i] + (fastest * 0.02,) + best[i + 1 :])
            best = min(tries + [best], key=error)
    return make(*best)


def expected_output_tokens(acceptance_per_position: Sequence[float], gamma: int) -> float:
    """E[accepted + 1] tokens per row from one draft of ``gamma`` tokens and its verify.

    ``acceptance_per_position[i]`` is the probability that draft token i is accepted given
    that tokens 0..i-1 were (positions past the end reuse the last value). The ``+ 1`` is the
    recovered token (after a rejection) or the bonus token (all accepted); so this is the
    mean acceptance length, which counts the bonus token::

        sum_{k=0..gamma} prod_{i<k} a_i

    Example: a = (0.8, 0.8), gamma = 2 -> 1 + 0.8 + 0.64 = 2.44; gamma = 0 -> 1.0.
    """
    total, reach = 1.0, 1.0
    last = len(acceptance_per_position) - 1
    for i in range(gamma):
        reach *= acceptance_per_position[min(i, last)]
        total += reach
    return total


def predicted_speedup(acceptance_per_position: Sequence[float], gamma: int, r: float, v: float) -> float:
    """Tokens per unit of time relative to plain decoding: E[accepted + 1] / (gamma * r + v).

    Example: a = (0.8,), gamma = 2, r = 0.5, v = 1.1 -> 2.44 / 2.1 = 1.162.
    """
    return expected_output_tokens(acceptance_per_position, gamma) / (gamma * r + v)


def batch_bucket(batch: int) -> int:
    """The power of two at or below ``batch`` (1 for 0 and 1): 5 -> 4, 8 -> 8, 15 -> 8."""
    return 1 << (max(batch, 1).bit_length() - 1)


class CostModel:
    """A ``CostProfile`` plus online correction from measured step times.

    Each prediction is multiplied by a factor per (kind, power-of-two batch bucket); a kind not
    yet measured in a bucket uses the target's factor there.
    ``observe`` moves that factor toward measured / predicted by ``refine_rate`` in log space
    (a geometric running mean, so a measurement 2x too slow and one 2x too fast cancel); a
    single ratio is clipped to [0.1, 10] so one outlier (a compile, a GC pause) cannot wreck it.
    """

    def __init__(self, profile: CostProfile, refine_rate: float = 0.1) -> None:
        check_float("CostModel", "refine_rate", refine_rate, low=0.0, high=1.0)
        self.profile = profile
        self.refine_rate = refine_rate
        self._log_factor: dict[tuple[str, int], float] = {}

    def factor(self, kind: str, batch: int) -> float:
        return math.exp(self._log(kind, batch_bucket(batch)))

    def _log(self, kind: str, bucket: int) -> float:
        """A draft or verify forward not measured yet in this bucket takes the target's factor:
        its ratio to the target step stays the profile's until measured (correcting the target
        alone would otherwise make speculation look cheaper or dearer than it is)."""
        log = self._log_factor.get((kind, bucket))
        if log is None and kind != "target":
            log = self._log_factor.get(("target", bucket))
        return log or 0.0

    def _raw(self, kind: str, batch: int, total_context: int, gamma: int) -> float:
        target, draft = self.profile.target, self.profile.draft
        catch_up = self.profile.structure == "draft-model"  # the drafter runs over every step's tokens
        if kind == "target":
            plain = target.time(batch, total_context, 1)
            return plain + draft.time(batch, total_context, 2) if catch_up else plain
        if kind == "draft":
            return draft.time(batch, total_context, 1)
        if kind == "verify":
            check_int("CostModel", "gamma", gamma, low=1)
            verify = target.time(batch, total_context, gamma + 1)
            if catch_up:
                verify += draft.time(batch, total_context, gamma + 1) - draft.time(batch, total_context, 1)
            return verify
        raise ValueError(f"CostModel kind must be one of {', '.join(KINDS)}, got {kind!r}")

    def time(self, kind: str, batch: int, total_context: int, gamma: int = 0) -> float:
        return self._raw(kind, batch, total_context, gamma) * self.factor(kind, batch)

    def target_time(self, batch: int, total_context: int) -> float:
        """One plain decoding step (one new token per row)."""
        return self.time("target", batch, total_context)

    def draft_time(self, batch: int, total_context: int) -> float:
        """One drafter forward (one new token per row); a draft of gamma tokens costs gamma of these."""
        return self.time("draft", batch, total_context)

    def verify_time(self, batch: int, total_context: int, gamma: int) -> float:
        """One target forward over gamma draft tokens plus the last committed one."""
        return self.time("verify", batch, total_context, gamma)

    def speculative_step_time(self, batch: int, total_context: int, gamma: int) -> float:
        """One whole speculative step: gamma drafter forwards and the verify."""
        return gamma * self.draft_time(batch, total_context) + self.verify_time(batch, total_context, gamma)

    def ratios(self, batch: int, total_context: int, gamma: int) -> tuple[float, float]:
        """(r, v) = (draft_time / target_time, verify_time / target_time)."""
        target = self.target_time(batch, total_context)
        return self.draft_time(batch, total_context) / target, self.verify_time(batch, total_context, gamma) / target

    def calibrate(self, kind: str, batch: int, total_context: int, seconds: float, gamma: int = 0) -> None:
        """Set the factor of (kind, batch bucket) so the prediction equals one measured time
        (a start-up measurement on this device; ``observe`` then keeps refining it)."""
        check_float("CostModel", "seconds", seconds, low=0.0, low_open=True)
        self._log_factor[(kind, batch_bucket(batch))] = math.log(seconds / self._raw(kind, batch, total_context, gamma))

    def observe_step(self, batch: int, total_context: int, gamma: int, seconds: float) -> None:
        """Refine the draft and verify factors of this batch bucket together with the measured time
        of one whole speculative step (gamma draft forwards + the verify), for engines that do not
        time the two apart: both move by the same log ratio, measured / predicted."""
        if self.refine_rate == 0.0 or seconds <= 0.0:
            return
        predicted = self.speculative_step_time(batch, total_context, gamma)
        step = self.refine_rate * math.log(min(max(seconds / predicted, 0.1), 10.0))
        bucket = batch_bucket(batch)
        for kind in ("draft", "verify"):
            self._log_factor[(kind, bucket)] = self._log(kind, bucket) + step

    def observe(self, kind: str, batch: int, total_context: int, seconds: float, gamma: int = 0) -> None:
        """Refine the factor of (kind, batch bucket) with one measured forward time.

        For ``kind="draft"`` pass the time of ONE draft forward (the step's draft time / gamma).
        """
        if self.refine_rate == 0.0 or seconds <= 0.0:
            return
        ratio = min(max(seconds / self._raw(kind, batch, total_context, gamma), 0.1), 10.0)
        key = (kind, batch_bucket(batch))
        old = self._log(*key)
        self._log_factor[key] = old + self.refine_rate * (math.log(ratio) - old)
