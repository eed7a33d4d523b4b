"""``ControllerConfig``: every knob of the speculation controller, frozen and validated.

Two choices make a controller: a *toggle* (speculate this step or not) and a *draft length*
policy (how many tokens, gamma, to draft when speculating). The named presets:

- ``"efficient"`` (ours): roofline toggle with hysteresis + goodput-optimal gamma every step;
- ``"paper"``: the paper's per-rollout monotone toggle + the {5, 7, 9, 11} gamma ladder;
- ``"sd-always"``: speculate every step with a fixed gamma; ``"ar"``: never speculate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from verl_efficientrollout._validate import check_choice, check_float, check_int, fail

TOGGLES = ("off", "always", "threshold", "roofline", "paper")
DRAFT_LENGTHS = ("fixed", "adaptive", "ladder")
PRESETS: dict[str, dict[str, Any]] = {
    "ar": {"toggle": "off", "draft_length": "fixed"},
    "sd-always": {"toggle": "always", "draft_length": "fixed"},
    "paper": {"toggle": "paper", "draft_length": "ladder"},
    "efficient": {"toggle": "roofline", "draft_length": "adaptive"},
}

_OWNER = "ControllerConfig"


@dataclass(frozen=True)
class ControllerConfig:
    """How the controller decides, per decode step, whether to speculate and with which gamma.

    toggle: ``"off"`` | ``"always"`` | ``"threshold"`` (speculate iff active batch <=
        ``threshold_batch_size``) | ``"roofline"`` (predicted speedup with hysteresis) |
        ``"paper"`` (off at each rollout start, on for good once the prediction clears ``margin``).
    draft_length: ``"fixed"`` (``gamma``) | ``"adaptive"`` (the gamma in
        [``gamma_min``, ``gamma_max``] with the best predicted speedup, every step) |
        ``"ladder"`` (``paper_ladder`` rungs, moved once per rollout by token acceptance).
    margin / off_margin: the roofline toggle turns on at predicted speedup >= ``margin`` and
        off below ``off_margin``; between the two it keeps its state (hysteresis band), and
        after a switch it holds for ``min_dwell_steps`` steps. The paper toggle uses ``margin``.
    acceptance_decay / prior_acceptance / prior_weight: the live acceptance estimator
        (see ``acceptance.py``).
    refine_rate: how fast measured step times correct the cost profile (0 switches it off).
    profile: a bundled profile name (``controller/profiles/<name>.json``), a JSON path, or
        ``auto``: the bundled profile measured here for the engine that runs the controller
        (``cost_model.DEFAULT_PROFILES``).
    """

    toggle: str = "roofline"
    draft_length: str = "adaptive"
    gamma: int = 4
    gamma_min: int = 1
    gamma_max: int = 8
    threshold_batch_size: int = 8
    margin: float = 1.05
    off_margin: float = 1.0
    min_dwell_steps: int = 8
    acceptance_decay: float = 0.98
    prior_acceptance: float = 0.8
    prior_weight: float = 4.0
    paper_min_requests: int = 32
    paper_ladder: tuple[int, ...] = (5, 7, 9, 11)
    ladder_up: float = 0.94
    ladder_down: float = 0.85
    ladder_patience: int = 2
    refine_rate: float = 0.1
    profile: str = "auto"

    def __post_init__(self) -> None:
        o = _OWNER
        check_choice(o, "toggle", self.toggle, TOGGLES)
        check_choice(o, "draft_length", self.draft_length, DRAFT_LENGTHS)
        check_int(o, "gamma_min", self.gamma_min, low=1)
        check_int(o, "gamma_max", self.gamma_max, low=self.gamma_min)
        check_int(o, "gamma", self.gamma, low=self.gamma_min, high=self.gamma_max)
        check_int(o, "threshold_batch_size", self.threshold_batch_size, low=0)
        check_float(o, "margin", self.margin, low=1.0)
        check_float(o, "off_margin", self.off_margin, low=0.0, low_open=True, high=self.margin)
        check_int(o, "min_dwell_steps", self.min_dwell_steps, low=0)
        check_float(o, "acceptance_decay", self.acceptance_decay, low=0.0, low_open=True, high=1.0)
        check_float(o, "prior_acceptance", self.prior_acceptance, low=0.0, high=1.0, low_open=True, high_open=True)
        check_float(o, "prior_weight", self.prior_weight, low=0.0)
        check_int(o, "paper_min_requests", self.paper_min_requests, low=0)
        ladder = self.paper_ladder
        ok = isinstance(ladder, tuple) and len(ladder) > 0
        ok = ok and all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in ladder)
        if not ok or any(a >= b for a, b in zip(ladder, ladder[1:])):
            fail(o, "paper_ladder", "a non-empty tuple of ascending integers >= 1", ladder)
        check_float(o, "ladder_up", self.ladder_up, low=0.0, high=1.0, low_open=True, high_open=True)
        check_float(o, "ladder_down", self.ladder_down, low=0.0, high=self.ladder_up, low_open=True, high_open=True)
        check_int(o, "ladder_patience", self.ladder_patience, low=1)
        check_float(o, "refine_rate", self.refine_rate, low=0.0, high=1.0)
        if not isinstance(self.profile, str) or not self.profile:
            fail(o, "profile", "'auto', a bundled profile name or a path to a JSON file", self.profile)

    @property
    def longest_draft(self) -> int:
        """The longest draft any policy of this config can ask for."""
        return max(self.gamma_max, max(self.paper_ladder))

    @property
    def draft_lengths(self) -> tuple[int, ...]:
        """Every draft length K > 0 this config's draft-length policy can schedule, ascending."""
        if self.draft_length == "fixed":
            return (self.gamma,)
        if self.draft_length == "adaptive":
            return tuple(range(self.gamma_min, self.gamma_max + 1))
        return self.paper_ladder

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ControllerConfig":
        """Build from a plain mapping (YAML, ``rollout.custom``); lists become tuples.

        >>> ControllerConfig.from_dict({"toggle": "paper", "paper_ladder": [3, 5]}).paper_ladder
        (3, 5)
        """
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"{_OWNER} got unknown keys {unknown}; allowed keys: {', '.join(allowed)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ControllerConfig":
        """A named preset (``PRESETS``) with optional field overrides."""
        check_choice(_OWNER, "preset", name, PRESETS)
        return cls.from_dict({**PRESETS[name], **overrides})
