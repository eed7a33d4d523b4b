"""``efficient-rollout bench --engine vllm``: the native benchmark's workload on vLLM.

vLLM fixes its speculative config when the engine starts, so each mode is one ``vllm.LLM``,
started in this process one after another, warmed up by an untimed short rollout, then timed on
the same requests and seeds as every other mode:

* ``ar``: plain vLLM, the baseline;
* ``sd-always``: the int4 self-drafter (vLLM's ``draft_model`` method), K = gamma every step;
* ``threshold``: vLLM's own dynamic speculative decoding table: K = gamma while at most
  ``threshold_batch_size`` requests are scheduled, 0 above;
* ``paper`` and ``efficient``: our controller inside vLLM's scheduler (``EfficientScheduler``).

Speculation must not change what is sampled: next to each ratio the report gives a two-sample
KS test of the mode's response lengths against plain vLLM's. vLLM reports no per-step times to
the caller, so there is no oracle bound here: the native benchmark gives it for this workload.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from verl_efficientrollout.bench import BenchConfig, capped, mode_config, ratio_bars, workload
from verl_efficientrollout.config import DrafterConfig, EfficientRolloutConfig, VLLMEngineConfig
from verl_efficientrollout.models import resolve_model
from verl_efficientrollout.reports import save_report
from verl_efficientrollout.stats import ks_two_sample


def run_vllm_bench(config: BenchConfig, out_dir: Path | None = None, engines: dict | None = None) -> dict:
    """``engines``: already started ``VLLMEngine``s by mode, used instead of starting those modes'
    engines (and left running); each must have been built with that mode's controller config."""
    from transformers import AutoTokenizer

    from verl_efficientrollout.vllm_backend.compat import vllm_version
    from verl_efficientrollout.vllm_backend.engine import VLLMEngine

    started = time.perf_counter()
    model = str(resolve_model(config.model))
    requests = workload(AutoTokenizer.from_pretrained(model), config)
    longest = max(len(r.prompt_ids) for r in requests) + config.max_new_tokens
    engine_config = VLLMEngineConfig(dtype=config.dtype, max_model_len=longest + 8,
                                     max_num_seqs=max(16, len(requests)))
    runs: dict[str, list[dict]] = {}
    for mode in tqdm(config.modes, desc="vLLM engines"):
        efficient = EfficientRolloutConfig(engine="vllm", drafter=DrafterConfig.from_name(config.drafter),
                                           controller=mode_config(mode, config), vllm=engine_config)
        given = (engines or {}).get(mode)
        if given is not None and given.config.controller != efficient.controller:
            raise ValueError(f"the engine given for mode {mode!r} was built with another controller config")
        engine = given or VLLMEngine(model, efficient)
        try:
            engine.generate(capped(requests, 32), seed=config.seed)
            runs[mode] = []
            for repeat in range(config.repeats):
                result = engine.generate(requests, seed=config.seed + repeat)
                runs[mode].append({**result.summary(), "response_lengths": [len(o.token_ids) for o in result.outputs]})
        finally:
            if given is None:
                engine.close()

    ar_lengths = [n for run in runs["ar"] for n in run["response_lengths"]]
    modes = {}
    for mode, mode_runs in runs.items():
        seconds = [r["seconds"] for r in mode_runs]
        ratios = [s / r["seconds"] for s, r in zip(seconds, runs["ar"])]
        drafted = [r for r in mode_runs if r["token_acceptance"] is not None]
        lengths = [n for run in mode_runs for n in run["response_lengths"]]
        modes[mode] = {
            "seconds": seconds,
            "ratio_vs_ar": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "tokens_per_second": statistics.median(r["tokens_per_second"] for r in mode_runs),
            "token_acceptance": statistics.mean(r["token_acceptance"] for r in drafted) if drafted else None,
            "mean_acceptance_length": statistics.mean(r["mean_acceptance_length"] for r in drafted) if drafted else None,
            "acceptance_per_position": drafted[-1]["acceptance_per_position"] if drafted else None,
            "lengths_ks_p_value_vs_ar": ks_two_sample(lengths, ar_lengths).p_value if mode != "ar" else None,
            "runs": mode_runs,
        }
    report = {
        "engine": "vllm", "vllm": vllm_version()[0], "config": asdict(config), "vllm_engine": asdict(engine_config),
        "rows": len(requests), "modes": modes, "seconds_total": time.perf_counter() - started,
    }
    save_report(report, out_dir, "bench_vllm", plot_vllm_bench)
    return report


def format_vllm_bench(report: dict) -> str:
    c = report["config"]
    lines = [
        f"workload: {c['prompts']} prompts x {c['samples']} samples = {report['rows']} rows, temperature "
        f"{c['temperature']}, up to {c['max_new_tokens']} new tokens; vLLM {report['vllm']}, {c['dtype']}, "
        f"drafter {DrafterConfig.from_name(c['drafter']).name}; one engine per mode, {c['repeats']} timed "
        f"repeat(s) each after a warm-up",
        "",
        "| mode | rollout s (per repeat) | ratio vs ar (min-max) | tokens/s | acceptance | mean accepted length "
        "| acceptance per position | lengths vs ar (KS p) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, m in report["modes"].items():
        def fmt(value, spec=".3f"):
            return "-" if value is None else format(value, spec)

        per_position = "-" if not m["acceptance_per_position"] else "/".join(
            fmt(a, ".2f") for a in m["acceptance_per_position"])
        lines.append(
            f"| {mode} | {', '.join(f'{s:.1f}' for s in m['seconds'])} | {m['ratio_vs_ar']:.3f} "
            f"({m['ratio_min']:.3f}-{m['ratio_max']:.3f}) | {m['tokens_per_second']:.1f} | {fmt(m['token_acceptance'])} "
            f"| {fmt(m['mean_acceptance_length'], '.2f')} | {per_position} | {fmt(m['lengths_ks_p_value_vs_ar'], '.2f')} |"
        )
    return "\n".join(lines)


def plot_vllm_bench(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ratio_bars(ax, report["modes"])
    ax.set_ylabel("rollout time / plain vLLM")
    ax.set_title(f"vLLM {report['vllm']}: {report['rows']} rows, drafter "
                 f"{DrafterConfig.from_name(report['config']['drafter']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
