"""``efficient-rollout bench --engine vllm``: the native benchmark's workload on vLLM.

vLLM fixes its speculative config when an engine starts, so each mode is one ``vllm.LLM``, started
in this process for one rollout at a time (vLLM engines alive beside a running one slow it
unevenly), warmed up by an untimed short rollout, then timed on the same requests and seeds as
every other mode, interleaved (every repeat runs each mode once, the order rotated):

* ``ar``: plain vLLM, the baseline;
* ``sd-always``: the int4 self-drafter (our proposer on the target's KV cache), K = gamma every step;
* ``threshold``, ``paper`` and ``efficient``: our controller inside vLLM's scheduler
  (``EfficientScheduler``); ``threshold`` sets K = gamma while at most ``threshold_batch_size``
  requests are scheduled, 0 above (vLLM's own table for this would make its runner's CUDA graphs
  piecewise for the whole engine);
* ``draft-model``: vLLM's ``draft_model`` method with the same int4 recipe (its drafter keeps a KV
  cache of its own and runs every step), K = gamma every step: the old route, for comparison.

Before the engines start, vLLM's own step times are measured (``calibrate``'s machinery: whole
decode steps at K = 0 and at each K, per batch size, in our scheduler) and a cost profile is
fitted to them; ``paper`` and ``efficient`` decide with that profile (written next to the report
as ``bench_vllm_profile.json``), as the native benchmark's modes decide with the one it fits. From
those the report gives, per batch size, the best per-step time ratio any K
reaches at the measured acceptance, and the oracle bound of the whole rollout (the simulator
replays plain vLLM's measured response lengths, taking every step the better of K = 0 and the
best K). Speculation must not change what is sampled: next to each ratio stands a two-sample KS
test of the mode's response lengths against plain vLLM's.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from tqdm.auto import tqdm

from verl_efficientrollout.bench import (
    BenchConfig, calibrated_cost_model, capped, mode_config, oracle_bound, ratio_bars, truncated_share, workload,
)
from verl_efficientrollout.config import DrafterConfig, EfficientRolloutConfig, VLLMEngineConfig
from verl_efficientrollout.controller import ControllerConfig, fit_profile, load_profile, save_profile
from verl_efficientrollout.engine.base import add_into
from verl_efficientrollout.controller.cost_model import expected_output_tokens
from verl_efficientrollout.models import resolve_model
from verl_efficientrollout.reports import save_report
from verl_efficientrollout.stats import ks_two_sample

STEP_GAMMAS = (1, 2, 3, 4, 6)  # K measured per batch size for the oracle
COST_MODEL_TOGGLES = ("roofline", "paper")  # toggles that decide with a cost profile


def vllm_mode_config(mode: str, config: BenchConfig, engine_config: VLLMEngineConfig) -> EfficientRolloutConfig:
    drafter = DrafterConfig.from_name(config.drafter)
    if mode == "draft-model":
        return EfficientRolloutConfig(engine="vllm", drafter=drafter, vllm=replace(engine_config, proposer="draft-model"),
                                      controller=ControllerConfig.preset("sd-always", gamma=config.gamma))
    return EfficientRolloutConfig(engine="vllm", drafter=drafter, controller=mode_config(mode, config),
                                  vllm=engine_config)


def measure_steps(config: BenchConfig, requests, rows: int) -> tuple[list[dict], str, str]:
    """vLLM's own decode-step times at K = 0 and each K of ``STEP_GAMMAS``, at batch sizes up to
    ``rows``, at two contexts around the workload's (``calibrate --engine vllm``'s measurement)."""
    from verl_efficientrollout.calibrate import CalibrateConfig
    from verl_efficientrollout.vllm_backend.calibrate import measure_vllm_step_costs

    prompt = statistics.mean(len(r.prompt_ids) for r in requests)
    contexts = (int(prompt + config.max_new_tokens // 8), int(prompt + config.max_new_tokens // 2))
    batches = tuple(b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max(rows, 4))  # at least three to fit
    calibrate = CalibrateConfig(model=config.model, engine="vllm", dtype=config.dtype, drafter=config.drafter,
                                batches=batches, contexts=contexts if contexts[0] < contexts[1] else (64, 128),
                                gammas=STEP_GAMMAS, repeats=3, name="bench")
    return measure_vllm_step_costs(calibrate)  # measurements, device, cost structure


def per_step_bounds(measurements: list[dict], acceptance: float) -> list[dict]:
    """Per batch size (at the workload's shorter context): plain step ms, each K's step ms, and the
    best time-per-token ratio of a K step to plain decoding at ``acceptance`` (1 = never pays)."""
    context = min(m["context"] for m in measurements)
    rows = []
    for batch in sorted({m["batch"] for m in measurements}):
        at = {(m["kind"], m["gamma"]): m["seconds"] for m in measurements if m["batch"] == batch and m["context"] == context}
        plain = at.get(("target", 0))
        if plain is None:
            continue
        steps = {g: s for (kind, g), s in at.items() if kind == "step"}
        ratios = {g: s / (expected_output_tokens([acceptance], g) * plain) for g, s in steps.items()}
        best = min(ratios, key=ratios.get) if ratios else None
        rows.append({"batch": batch, "context": context, "plain_ms": 1e3 * plain,
                     "step_ms": {g: 1e3 * s for g, s in sorted(steps.items())},
                     "best_gamma": best, "best_ratio": min(1.0, ratios[best]) if best else 1.0})
    return rows


def native_acceptance(model: str, config: BenchConfig, requests) -> dict:
    """Acceptance per draft position of the native engine with the same drafter recipe, the same
    target dtype and K on the same requests and seeds as vLLM's ``sd-always`` (the drafter is the
    same int4 copy of the same weights: the two engines should agree)."""
    from verl_efficientrollout.controller import Controller
    from verl_efficientrollout.engine.native import NativeEngine, NativeEngineConfig

    engine = NativeEngine.load(model, EfficientRolloutConfig(drafter=DrafterConfig.from_name(config.drafter)),
                               NativeEngineConfig(dtype=config.dtype, device="cpu"))
    drafted, accepted = [], []
    for repeat in tqdm(range(config.repeats), desc="native sd-always"):
        controller = Controller(ControllerConfig.preset("sd-always", gamma=config.gamma))
        result = engine.generate(requests, seed=config.seed + repeat, controller=controller)
        add_into(drafted, result.drafted_per_position)
        add_into(accepted, result.accepted_per_position)
    return {"dtype": config.dtype, "acceptance_per_position": [a / d for a, d in zip(accepted, drafted)],
            "drafted_per_position": drafted}


def run_vllm_bench(config: BenchConfig, out_dir: Path | None = None, engines: dict | None = None,
                   measure: bool = True, compare_native: bool = True) -> dict:
    """``engines``: already started ``VLLMEngine``s by mode, used instead of starting those modes'
    engines (and left running); each must have been built with that mode's config. ``measure``:
    time vLLM's steps for the oracle bound first (one more engine start-up). ``compare_native``:
    also run the native engine's ``sd-always`` on the same requests (acceptance per position)."""
    from transformers import AutoTokenizer

    from verl_efficientrollout.vllm_backend.compat import vllm_version
    from verl_efficientrollout.vllm_backend.engine import VLLMEngine

    started = time.perf_counter()
    model = str(resolve_model(config.model))
    requests = workload(AutoTokenizer.from_pretrained(model), config)
    longest = max(len(r.prompt_ids) for r in requests) + config.max_new_tokens
    # Room for the longest draft past the longest request: vLLM drafts nothing (zeros, all rejected)
    # for a request within K of max_model_len.
    headroom = max(ControllerConfig.preset("paper").paper_ladder) + 8
    engine_config = VLLMEngineConfig(dtype=config.dtype, max_model_len=longest + headroom,
                                     max_num_seqs=max(16, len(requests)), cpu_kv_cache_gib=1.0)
    configs = {mode: vllm_mode_config(mode, config, engine_config) for mode in config.modes}
    for mode, given in (engines or {}).items():
        if given.config.controller != configs[mode].controller or given.config.vllm.proposer != configs[mode].vllm.proposer:
            raise ValueError(f"the engine given for mode {mode!r} was built with another controller config")
        if given.config.vllm.dtype != config.dtype:  # the report says config.dtype: it must be what ran
            raise ValueError(f"the engine given for mode {mode!r} runs {given.config.vllm.dtype}, but BenchConfig.dtype "
                             f"is {config.dtype!r}: pass dtype={given.config.vllm.dtype!r}")
    # vLLM's step times first, on an engine of their own (closed before the benchmark's engines start)
    measurements, device, structure = measure_steps(config, requests, len(requests)) if measure else ([], None, None)
    profile, profile_modes = None, []
    if measurements:
        # Fitted here, on this machine: the cost-model modes decide with it (as the native bench's
        # do) and the oracle bound replays it.
        profile = fit_profile(measurements, load_profile(ControllerConfig().profile), "measured", device, structure)
        profile_path = Path(out_dir or tempfile.mkdtemp(prefix="bench_vllm_")) / "bench_vllm_profile.json"
        profile_path.parent.mkdir(parents=True, exist_ok=True)
        save_profile(profile, profile_path)
        for mode, settings in configs.items():
            if settings.controller.toggle in COST_MODEL_TOGGLES and mode not in (engines or {}):
                configs[mode] = replace(settings, controller=replace(settings.controller, profile=str(profile_path)))
                profile_modes.append(mode)

    runs, routes = {mode: [] for mode in config.modes}, {}
    order = list(config.modes)
    with tqdm(total=config.repeats * len(order), desc="rollouts") as progress:
        for repeat in range(config.repeats):
            for mode in order[repeat % len(order):] + order[: repeat % len(order)]:  # interleaved, rotated
                progress.set_postfix_str(f"repeat {repeat}, {mode}")
                # Each engine runs alone: vLLM engines alive beside a running one slowed it, and the
                # speculative ones more than plain vLLM (measured: a K = 0 engine 1.4x plain vLLM with
                # five others alive, 1.00x alone), so an engine we start lives for one rollout only.
                engine = (engines or {}).get(mode) or VLLMEngine(model, configs[mode])
                try:
                    engine.generate(capped(requests, 32), seed=config.seed)  # warm-up
                    result = engine.generate(requests, seed=config.seed + repeat)
                    routes[mode] = engine.proposer
                finally:
                    if mode not in (engines or {}):
                        engine.close()
                runs[mode].append({**result.summary(), "response_lengths": [len(o.token_ids) for o in result.outputs],
                                   "truncated_share": truncated_share(result.outputs)})
                progress.update()

    native = native_acceptance(model, config, requests) if compare_native and "sd-always" in runs else None
    ar_lengths = [n for run in runs["ar"] for n in run["response_lengths"]]
    true_costs = None
    if profile is not None:
        true_costs = calibrated_cost_model(profile, 0.0, [m for m in measurements if m["kind"] == "target"])
    prompt_lengths = [len(r.prompt_ids) for r in requests]

    def bound(acceptance: float) -> float | None:  # median over plain vLLM's repeats' lengths
        if true_costs is None:
            return None
        return statistics.median(oracle_bound(prompt_lengths, r["response_lengths"], acceptance, true_costs)
                                 for r in runs["ar"])

    modes = {}
    for mode, mode_runs in runs.items():
        seconds = [r["seconds"] for r in mode_runs]
        ratios = [s / r["seconds"] for s, r in zip(seconds, runs["ar"])]
        drafted = [r for r in mode_runs if r["token_acceptance"] is not None]
        lengths = [n for run in mode_runs for n in run["response_lengths"]]
        acceptance = statistics.mean(r["token_acceptance"] for r in drafted) if drafted else None
        modes[mode] = {
            "proposer": routes[mode],
            "seconds": seconds,
            "ratio_vs_ar": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "tokens_per_second": statistics.median(r["tokens_per_second"] for r in mode_runs),
            "token_acceptance": acceptance,
            "mean_acceptance_length": statistics.mean(r["mean_acceptance_length"] for r in drafted) if drafted else None,
            "acceptance_per_position": _pooled_per_position(drafted),
            "oracle_bound": bound(acceptance) if acceptance else None,
            "lengths_ks_p_value_vs_ar": ks_two_sample(lengths, ar_lengths).p_value if mode != "ar" else None,
            "runs": mode_runs,
        }
    measured = [m["token_acceptance"] for m in modes.values() if m["token_acceptance"]]
    best_acceptance = max(measured) if measured else None
    report = {
        "engine": "vllm", "vllm": vllm_version()[0], "config": asdict(config), "vllm_engine": asdict(engine_config),
        "rows": len(requests), "device": device, "modes": modes,
        "oracle_bound": bound(best_acceptance) if best_acceptance else None,
        "truncated_share": statistics.mean(r["truncated_share"] for r in runs["ar"]),  # plain vLLM's rows at the cap
        "per_step": per_step_bounds(measurements, best_acceptance) if measurements and best_acceptance else [],
        "fitted_profile": profile.to_dict() if profile is not None else None,
        "profile_modes": profile_modes,
        "step_measurements": measurements, "native_sd_always": native,
        "seconds_total": time.perf_counter() - started,
    }
    save_report(report, out_dir, "bench_vllm", plot_vllm_bench)
    return report


def _pooled_per_position(runs: list[dict]) -> list[float] | None:
    """Acceptance per draft position over all repeats (each run's rates weighted by its drafts)."""
    drafted, accepted = [], []
    for run in runs:
        for i, rate in enumerate(run["acceptance_per_position"]):
            if rate is None:
                continue
            weight = run["drafted_tokens"] or 1
            while len(drafted) <= i:
                drafted.append(0.0)
                accepted.append(0.0)
            drafted[i] += weight
            accepted[i] += weight * rate
    return [a / d for a, d in zip(accepted, drafted)] if drafted else None


def format_vllm_bench(report: dict) -> str:
    c = report["config"]

    def fmt(value, spec=".3f"):
        return "-" if value is None else format(value, spec)

    lines = [
        f"workload: {c['workload']}, {c['prompts']} prompts x {c['samples']} samples = {report['rows']} rows, "
        f"temperature {c['temperature']}, top_p {c.get('top_p', 1.0)}, up to {c['max_new_tokens']} new tokens; vLLM {report['vllm']}, {c['dtype']}, "
        f"drafter {DrafterConfig.from_name(c['drafter']).name}; one engine per mode and rollout, {c['repeats']} "
        f"interleaved repeat(s), each after a warm-up; {report['device'] or 'step times not measured'}",
        "",
        "| mode | drafter route | rollout s (per repeat) | ratio vs ar (min-max) | oracle bound | tokens/s | acceptance "
        "| mean accepted length | acceptance per position | lengths vs ar (KS p) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, m in report["modes"].items():
        per_position = "-" if not m["acceptance_per_position"] else "/".join(
            fmt(a, ".2f") for a in m["acceptance_per_position"])
        lines.append(
            f"| {mode} | {m['proposer'] or '-'} | {', '.join(f'{s:.1f}' for s in m['seconds'])} | "
            f"{m['ratio_vs_ar']:.3f} ({m['ratio_min']:.3f}-{m['ratio_max']:.3f}) | {fmt(m['oracle_bound'])} | "
            f"{m['tokens_per_second']:.1f} | {fmt(m['token_acceptance'])} | {fmt(m['mean_acceptance_length'], '.2f')} "
            f"| {per_position} | {fmt(m['lengths_ks_p_value_vs_ar'], '.2f')} |")
    if report.get("truncated_share") is not None:
        lines += ["", f"plain vLLM's rollout: {report['truncated_share']:.0%} of rows truncated at the cap"]
    if report.get("profile_modes"):
        lines += ["", f"{', '.join(report['profile_modes'])}: decided with the cost profile fitted to this run's "
                  "step times (below; bench_vllm_profile.json)"]
    native, spec = report.get("native_sd_always"), report["modes"].get("sd-always")
    if native and spec and spec["acceptance_per_position"]:
        pairs = list(zip(spec["acceptance_per_position"], native["acceptance_per_position"]))
        lines += ["", f"acceptance per position, sd-always K = {c['gamma']}, same requests and seeds: vLLM "
                  + "/".join(f"{v:.3f}" for v, _ in pairs) + ", native engine (" + native["dtype"] + ") "
                  + "/".join(f"{n:.3f}" for _, n in pairs) + "; largest difference "
                  + f"{max(abs(v - n) for v, n in pairs):.3f}"]
    if report["per_step"]:
        lines += ["", f"oracle bound at the best measured acceptance: {fmt(report['oracle_bound'])}", "",
                  "vLLM's measured step times (ms) and the best per-step time ratio at that acceptance:",
                  "| rows | K = 0 | " + " | ".join(f"K = {g}" for g in report["per_step"][0]["step_ms"]) +
                  " | best K | best ratio |",
                  "| --- | --- | " + " | ".join("---" for _ in report["per_step"][0]["step_ms"]) + " | --- | --- |"]
        for r in report["per_step"]:
            lines.append(f"| {r['batch']} | {r['plain_ms']:.1f} | " + " | ".join(f"{v:.1f}" for v in r["step_ms"].values())
                         + f" | {r['best_gamma']} | {r['best_ratio']:.3f} |")
    return "\n".join(lines)


def plot_vllm_bench(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    ratio_bars(ax, report["modes"])
    if report["oracle_bound"] is not None:
        ax.axhline(report["oracle_bound"], color="tab:green", linestyle="--", linewidth=1,
                   label=f"oracle bound {report['oracle_bound']:.3f}")
        ax.legend(fontsize=8)
    ax.set_ylabel("rollout time / plain vLLM")
    ax.set_title(f"vLLM {report['vllm']}: {report['rows']} rows ({report['config']['workload']}), drafter "
                 f"{DrafterConfig.from_name(report['config']['drafter']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
