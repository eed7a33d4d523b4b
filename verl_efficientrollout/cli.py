"""``efficient-rollout``: the command line.

    efficient-rollout quality [--model DIR] [--recipes int4-g32,int4-g64] [--out results/quality]
    efficient-rollout model-path [--model DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _csv(kind):
    return lambda text: tuple(kind(item) for item in text.split(",") if item.strip())


def _parser() -> argparse.ArgumentParser:
    from verl_efficientrollout.quality import QualityConfig

    defaults = QualityConfig()
    parser = argparse.ArgumentParser(prog="efficient-rollout", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

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

    model_path = commands.add_parser("model-path", help="print the local directory of a model (converts the default)")
    model_path.add_argument("--model", default="default")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "model-path":
            from verl_efficientrollout.models import resolve_model

            print(resolve_model(args.model))
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
