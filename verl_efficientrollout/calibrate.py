"""``efficient-rollout calibrate``: measure this device's step costs, fit a cost profile, check it.

Native engine: target steps, drafter steps and verify forwards (gamma + 1 tokens per row) over
batch sizes x contexts x gammas. vLLM (``--engine vllm``, ``vllm_backend.calibrate``): whole vLLM
decode steps at K = 0 and at each gamma, timed in vLLM's scheduler (vLLM drafts and verifies in
one step). Either way the roofline profile is fitted to every context but the longest
(``controller.fit_profile``) and validated on the held-out longest context: predicted vs
measured step time, and how often "speculation pays" (E[accepted + 1] x plain step > speculative
step, at a few acceptance levels) is decided the same way from the prediction as from the
measurement. The saved profile is then refitted on all measurements; point the controller at it
with ``controller.profile: <path>``. ``<name>.calibration.json`` beside it keeps every measurement
and the validation.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from verl_efficientrollout._validate import check_choice, check_int
from verl_efficientrollout.config import (
    DTYPES, MEASURED_ENGINES, DrafterConfig, EfficientRolloutConfig, NativeEngineConfig,
)
from verl_efficientrollout.controller import ControllerConfig, CostModel, fit_profile, load_profile
from verl_efficientrollout.controller.cost_model import expected_output_tokens, save_profile

ACCEPTANCE_LEVELS = (0.5, 0.7, 0.9)


@dataclass(frozen=True)
class CalibrateConfig:
    """``repeats``: timed steps per point (native: medians of that many forwards; vLLM: clean
    decode steps per gamma and batch). ``dtype`` ``auto``: float32 native, bfloat16 vLLM (the
    faster choice of each on this CPU)."""

    model: str = "default"
    engine: str = "native"
    dtype: str = "auto"
    device: str = "auto"
    drafter: str = "int4-g32"
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    contexts: tuple[int, ...] = (128, 384, 768)  # the longest is held out for validation
    gammas: tuple[int, ...] = (2, 4, 6)
    repeats: int = 3
    name: str = "measured"

    def __post_init__(self) -> None:
        check_choice("CalibrateConfig", "engine", self.engine, MEASURED_ENGINES)
        if self.dtype == "auto" and self.engine == "vllm":
            object.__setattr__(self, "dtype", "bfloat16")
        check_choice("CalibrateConfig", "dtype", self.dtype, ("auto", *DTYPES))  # native auto: measured at start-up
        NativeEngineConfig(dtype=self.dtype, device=self.device)
        if self.engine == "vllm" and self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"CalibrateConfig.device must be one of auto, cpu, cuda with engine vllm (vLLM picks "
                             f"its own device), got {self.device!r}")
        DrafterConfig.from_name(self.drafter)
        for field, values, low in (("batches", self.batches, 1), ("contexts", self.contexts, 1),
                                   ("gammas", self.gammas, 1)):
            if not values:
                raise ValueError(f"CalibrateConfig.{field} must be a non-empty list of integers >= {low}, got ()")
            for value in values:
                check_int("CalibrateConfig", field, value, low=low)
        if max(self.gammas) > 8:
            raise ValueError(f"CalibrateConfig.gammas must be integers in [1, 8], got {self.gammas!r}")
        if len(set(self.contexts)) < 2:
            raise ValueError(f"CalibrateConfig.contexts must hold at least two lengths (one is held out), "
                             f"got {self.contexts!r}")
        fitted = len(set(self.batches)) * (len(set(self.contexts)) - 1)
        if fitted < 3:
            raise ValueError(f"CalibrateConfig.batches x contexts must give at least 3 step sizes to fit besides the "
                             f"held-out longest context, got {len(set(self.batches))} batch size(s) x "
                             f"{len(set(self.contexts)) - 1} fitted context(s)")
        check_int("CalibrateConfig", "repeats", self.repeats, low=1)
        if not self.name or "/" in self.name:
            raise ValueError(f"CalibrateConfig.name must be a file stem without '/', got {self.name!r}")


def run_calibrate(config: CalibrateConfig, out_dir: Path) -> dict:
    started = time.perf_counter()
    contexts = sorted(set(config.contexts))
    if config.engine == "vllm":
        from verl_efficientrollout.vllm_backend.calibrate import measure_vllm_step_costs

        measurements, device, structure = measure_vllm_step_costs(config)
    else:
        (measurements, device), structure = _measure_native(config, contexts), "native"
    base = load_profile(ControllerConfig().profile)  # the model's byte and FLOP counts
    held_out = [m for m in measurements if m["context"] == contexts[-1]]
    fitted = fit_profile([m for m in measurements if m not in held_out], base, config.name, device, structure)
    validation = validate(CostModel(fitted, refine_rate=0.0), held_out, config.gammas)
    profile = fit_profile(measurements, base, config.name, device, structure)
    out_dir.mkdir(parents=True, exist_ok=True)
    profile_path = out_dir / f"{config.name}.json"
    save_profile(profile, profile_path)
    report = {"config": asdict(config), "device": device, "profile_path": str(profile_path),
              "profile": profile.to_dict(), "held_out_context": contexts[-1], "validation": validation,
              "measurements": measurements, "seconds": time.perf_counter() - started}
    (out_dir / f"{config.name}.calibration.json").write_text(json.dumps(report, indent=2))
    return report


def _measure_native(config: CalibrateConfig, contexts: list[int]) -> tuple[list[dict], str]:
    from verl_efficientrollout.bench import describe_device
    from verl_efficientrollout.engine.native import NativeEngine

    engine = NativeEngine.load(
        config.model, EfficientRolloutConfig(drafter=DrafterConfig.from_name(config.drafter)),
        NativeEngineConfig(dtype=config.dtype, device=config.device, max_model_len=contexts[-1] + max(config.gammas) + 2),
    )
    if engine.drafter is None:
        raise RuntimeError("no drafter could be built: nothing to calibrate (see the warning above)")
    measurements = []
    for context in tqdm(contexts, desc="contexts"):
        measurements += [{**m, "context": context}
                         for m in engine.measure_step_costs(config.batches, context, config.gammas, config.repeats)]
    return measurements, describe_device(engine.engine_config.device)


def speculative_step_seconds(times: dict, batch: int, gamma: int) -> float | None:
    """A whole speculative step of ``gamma`` drafts: measured as one (vLLM: kind ``step``) or
    gamma draft forwards plus the verify (native); None when ``times`` lacks it."""
    if ("step", batch, gamma) in times:
        return times["step", batch, gamma]
    if ("draft", batch, 0) in times and ("verify", batch, gamma) in times:
        return gamma * times["draft", batch, 0] + times["verify", batch, gamma]
    return None


def validate(cost_model: CostModel, measurements: list[dict], gammas) -> dict:
    """Predicted vs measured time of each step, and agreement of the speculation-pays decision."""
    def predict(m: dict) -> float:
        if m["kind"] == "step":
            return cost_model.speculative_step_time(m["batch"], m["total_context"], m["gamma"])
        return cost_model.time(m["kind"], m["batch"], m["total_context"], m["gamma"])

    measured = {(m["kind"], m["batch"], m["gamma"]): m["seconds"] for m in measurements}
    predicted = {(m["kind"], m["batch"], m["gamma"]): predict(m) for m in measurements}
    rows = [{**m, "predicted_seconds": predicted[m["kind"], m["batch"], m["gamma"]],
             "error": predicted[m["kind"], m["batch"], m["gamma"]] / m["seconds"] - 1} for m in measurements]
    agree, total = 0, 0
    for batch in sorted({b for kind, b, _ in measured if kind == "target"}):
        for gamma in gammas:
            steps = [speculative_step_seconds(t, batch, gamma) for t in (measured, predicted)]
            if steps[0] is None:
                continue
            for acceptance in ACCEPTANCE_LEVELS:
                tokens = expected_output_tokens([acceptance], gamma)
                decisions = [tokens * t["target", batch, 0] > step for t, step in zip((measured, predicted), steps)]
                agree += decisions[0] == decisions[1]
                total += 1
    return {"rows": rows, "median_abs_error": statistics.median(abs(r["error"]) for r in rows),
            "decision_agreement": agree / total if total else None, "decisions": total}


def format_calibrate(report: dict) -> str:
    v = report["validation"]
    lines = [f"device: {report['device']}; {report['config']['engine']} engine, drafter {report['config']['drafter']}, "
             f"{report['config']['dtype']} target",
             f"profile written to {report['profile_path']} (use it with controller.profile: <that path>)", "",
             f"validation on the held-out context {report['held_out_context']} tokens per row:",
             "| step | rows | gamma | measured ms | predicted ms | error |", "| --- | --- | --- | --- | --- | --- |"]
    for r in v["rows"]:
        lines.append(f"| {r['kind']} | {r['batch']} | {r['gamma'] or '-'} | {1e3 * r['seconds']:.2f} | "
                     f"{1e3 * r['predicted_seconds']:.2f} | {r['error']:+.0%} |")
    agreement = "-" if v["decision_agreement"] is None else f"{v['decision_agreement']:.0%}"
    lines += ["", f"median |error| {v['median_abs_error']:.0%}; 'speculation pays' decided as measured in "
              f"{agreement} of {v['decisions']} cases (acceptance {', '.join(map(str, ACCEPTANCE_LEVELS))})"]
    return "\n".join(lines)
