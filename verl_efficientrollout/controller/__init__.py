"""Per-decode-step speculation controller: pure Python, imports no torch.

Each step the engine asks ``Controller.decide(EngineState)`` whether to speculate and with
which draft length gamma, runs the step, and reports back with ``Controller.observe``. The
decision comes from a roofline cost model of the target, draft and verify forwards
(``cost_model.py``) and a live estimate of per-position acceptance (``acceptance.py``);
``simulator.py`` replays a rollout through it deterministically.
"""

from .acceptance import AcceptanceEstimator, per_position_counts
from .config import DRAFT_LENGTHS, PRESETS, TOGGLES, ControllerConfig
from .controller import Controller, ControllerStats, StepObservation
from .cost_model import (
    CostModel,
    CostProfile,
    StepCost,
    bundled_profiles,
    expected_output_tokens,
    fit_profile,
    load_profile,
    predicted_speedup,
    resolve_profile,
    save_profile,
)
from .policies import Decision, EngineState
from .simulator import SimResult, Trace, simulate, simulate_ar

__all__ = [
    "AcceptanceEstimator",
    "Controller",
    "ControllerConfig",
    "ControllerStats",
    "CostModel",
    "CostProfile",
    "DRAFT_LENGTHS",
    "Decision",
    "EngineState",
    "PRESETS",
    "SimResult",
    "StepCost",
    "StepObservation",
    "TOGGLES",
    "Trace",
    "bundled_profiles",
    "expected_output_tokens",
    "fit_profile",
    "load_profile",
    "per_position_counts",
    "predicted_speedup",
    "resolve_profile",
    "save_profile",
    "simulate",
    "simulate_ar",
]
