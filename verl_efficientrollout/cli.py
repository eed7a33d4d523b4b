"""``efficient-rollout``: the command line.

    efficient-rollout bench [--model DIR] [--drafter int4-g32] [--out results/bench]
    efficient-rollout quality [--model DIR] [--recipes int4-g32,int4-g64] [--out results/quality]
    efficient-rollout model-path [--model DIR]
    efficient-rollout verl-dry-run OVERRIDE [OVERRIDE ...]
    efficient-rollout config-reference | metrics-reference
    efficient-rollout calibrate [--engine vllm] [--model DIR] [--device cuda] [--name NAME] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _csv(kind):
    return lambda text: tuple(kind(item) for item in text.split(",") if item.strip())


def _parser() -> argparse.ArgumentParser:
    from verl_efficientrollout.bench import BenchConfig
    from verl_efficientrollout.calibrate import CalibrateConfig
    from verl_efficientrollout.quality import QualityConfig

    defaults = QualityConfig()
    parser = argparse.ArgumentParser(prog="efficient-rollout", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    b = BenchConfig()
    bench = commands.add_parser("bench", help="rollout latency of each speculation policy vs plain decoding")
    bench.add_argument("--model", default=b.model, help="'default' or a local HF model directory")
    bench.add_argument("--engine", default=b.engine, help="native (default) or vllm (needs vLLM installed)")
    bench.add_argument("--dtype", default="auto", help="auto (native: the faster of float32 and bfloat16, measured at "
                       "start-up; vllm: bfloat16), float32, bfloat16, float16")
    bench.add_argument("--device", default=b.device, help="auto (CUDA when torch sees a GPU), cpu, cuda, cuda:N")
    bench.add_argument("--drafter", default=b.drafter, help="drafter recipe: int4-g32, int4-g64, ..., int8")
    bench.add_argument("--workload", default=b.workload, help="grpo (default: bundled math problems, a GRPO "
                       "rollout's long tail, 1024 tokens), math (the old 16 rows x 256 tokens) or short (short answers)")
    bench.add_argument("--prompts", type=int, default=0, help="0: the workload's")
    bench.add_argument("--samples", type=int, default=0, help="0: the workload's")
    bench.add_argument("--max-new-tokens", type=int, default=0, help="0: the workload's")
    bench.add_argument("--temperature", type=float, default=-1.0, help="-1: the workload's")
    bench.add_argument("--top-p", type=float, default=-1.0, help="-1: the workload's")
    bench.add_argument("--repeats", type=int, default=0, help="0: the workload's (grpo 1, math and short 2)")
    bench.add_argument("--modes", type=_csv(str), default=(), help="from ar,sd-always,threshold,paper,efficient "
                       "(vllm: also draft-model); default: all of the engine's")
    bench.add_argument("--gamma", type=int, default=b.gamma, help="gamma of sd-always and threshold")
    bench.add_argument("--threshold-batch-size", type=int, default=b.threshold_batch_size)
    bench.add_argument("--perturbations", type=_csv(float), default=b.perturbations)
    bench.add_argument("--seed", type=int, default=b.seed)
    bench.add_argument("--against", default=b.against, choices=("", "vllm"), help="vllm: also run plain vLLM on the "
                       "same requests (in its own environment) and compare it with the native ar and efficient modes")
    bench.add_argument("--vllm-dtype", default=b.vllm_dtype, help="dtype of plain vLLM with --against vllm")
    bench.add_argument("--vllm-python", default=b.vllm_python, help="Python of the environment with vLLM "
                       "(default: .venv-vllm/bin/python if present)")
    bench.add_argument("--out", type=Path, default=Path("results/bench"), help="folder for bench.json/.png")

    quality = commands.add_parser("quality", help="drafter quality report: acceptance, bytes, build time, step costs")
    quality.add_argument("--model", default=defaults.model, help="'default' or a local HF model directory")
    quality.add_argument("--dtype", default=defaults.dtype, help="target dtype: float32, bfloat16, float16")
    quality.add_argument("--recipes", type=_csv(str), default=defaults.recipes, help="e.g. int4-g32,int4-g64,int8")
    quality.add_argument("--temperatures", type=_csv(float), default=defaults.temperatures)
    quality.add_argument("--problems", type=int, default=defaults.num_problems, dest="num_problems")
    quality.add_argument("--samples", type=int, default=defaults.samples_per_problem, dest="samples_per_problem")
    quality.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    quality.add_argument("--batch-sizes", type=_csv(int), default=defaults.batch_sizes)
    quality.add_argument("--context", type=int, default=defaults.context)
    quality.add_argument("--gamma", type=int, default=defaults.gamma)
    quality.add_argument("--repeats", type=int, default=defaults.repeats)
    quality.add_argument("--seed", type=int, default=defaults.seed)
    quality.add_argument("--out", type=Path, default=Path("results/quality"), help="folder for quality.json/.png")

    c = CalibrateConfig()
    calibrate = commands.add_parser("calibrate", help="measure step costs on this device and fit a cost profile")
    calibrate.add_argument("--model", default=c.model, help="'default' or a local HF model directory")
    calibrate.add_argument("--engine", default=c.engine, help="native (default) or vllm (needs vLLM installed)")
    calibrate.add_argument("--dtype", default="auto", help="auto (native: the faster of float32 and bfloat16, "
                           "measured at start-up; vllm: bfloat16), float32, bfloat16, float16")
    calibrate.add_argument("--device", default=c.device, help="auto, cpu, cuda, cuda:N")
    calibrate.add_argument("--drafter", default=c.drafter, help="drafter recipe: int4-g32, int4-g64, ..., int8")
    calibrate.add_argument("--batches", type=_csv(int), default=c.batches)
    calibrate.add_argument("--contexts", type=_csv(int), default=c.contexts, help="the longest is held out")
    calibrate.add_argument("--gammas", type=_csv(int), default=c.gammas)
    calibrate.add_argument("--repeats", type=int, default=c.repeats)
    calibrate.add_argument("--name", default=c.name, help="profile name (file stem)")
    calibrate.add_argument("--out", type=Path, default=Path("results/calibrate"), help="folder for <name>.json")

    dry = commands.add_parser("verl-dry-run", help="compose and validate verl trainer overrides against verl's "
                              "own hydra config, without a GPU (examples/grpo/*.sh with DRY_RUN=1)")
    dry.add_argument("--save", type=Path, default=None, help="also write the composed, resolved config (YAML)")
    dry.add_argument("overrides", nargs="*", help="hydra overrides, as given to python -m verl.trainer.main_ppo")
    commands.add_parser("config-reference", help="print every configuration key, its default and allowed values")
    commands.add_parser("metrics-reference", help="print every reported metric and what it means")
    model_path = commands.add_parser("model-path", help="print the local directory of a model (converts the default)")
    model_path.add_argument("--model", default="default")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "calibrate":
            from verl_efficientrollout.calibrate import CalibrateConfig, format_calibrate, run_calibrate

            fields = {k: v for k, v in vars(args).items() if k in CalibrateConfig.__dataclass_fields__}
            print(format_calibrate(run_calibrate(CalibrateConfig(**fields), args.out)))
            return 0
        if args.command == "config-reference":
            from verl_efficientrollout.config_reference import reference_markdown

            print(reference_markdown())
            return 0
        if args.command == "verl-dry-run":
            from verl_efficientrollout.verl_adapter.dry_run import dry_run

            report = dry_run(args.overrides)
            print(report.format())
            if args.save is not None:
                from omegaconf import OmegaConf

                OmegaConf.save(report.config, args.save)
            return 0
        if args.command == "metrics-reference":
            from verl_efficientrollout.metrics import metrics_markdown

            print(metrics_markdown())
            return 0
        if args.command == "model-path":
            from verl_efficientrollout.models import resolve_model

            print(resolve_model(args.model))
            return 0
        if args.command == "bench":
            from verl_efficientrollout.bench import BenchConfig, format_bench, run_bench

            config = BenchConfig(**{k: v for k, v in vars(args).items() if k in BenchConfig.__dataclass_fields__})
            if config.engine == "vllm":
                from verl_efficientrollout.vllm_backend.bench import format_vllm_bench, run_vllm_bench

                print(format_vllm_bench(run_vllm_bench(config, args.out)))
                print(f"\nwrote {args.out / 'bench_vllm.json'} and {args.out / 'bench_vllm.png'}")
                return 0
            print(format_bench(run_bench(config, args.out)))
            print(f"\nwrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
            return 0
        from verl_efficientrollout.quality import QualityConfig, format_quality, run_quality

        fields = {k: v for k, v in vars(args).items() if k in QualityConfig.__dataclass_fields__}
        config = QualityConfig(**fields)
        report = run_quality(config, args.out)
    except ValueError as exc:
        print(f"efficient-rollout: error: {exc}", file=sys.stderr)
        return 2
    print(format_quality(report))
    print(f"\nwrote {args.out / 'quality.json'} and {args.out / 'quality.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
