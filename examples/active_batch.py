"""The picture of the idea: the active batch shrinks during a rollout, and where speculation switches on.

    python examples/active_batch.py [--drafter int4-g32] [--out docs/measured/cpu]

One rollout of the benchmark's default workload (``grpo``: 8 bundled math problems x 2 samples, up to
1024 tokens, temperature 1, top_p 0.9) on the default model with the ``efficient`` preset and the shipped
cost profile, after an untimed warm-up. Plots the active batch over the rollout's wall time,
shaded where the controller speculated, with the gamma it chose; writes ``active_batch.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", default="int4-g32")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0: the workload's cap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/active_batch"))
    args = parser.parse_args(argv)

    from verl_efficientrollout.bench import BenchConfig, capped, workload
    from verl_efficientrollout.config import EfficientRolloutConfig
    from verl_efficientrollout.controller import Controller, ControllerConfig
    from verl_efficientrollout.engine.native import NativeEngine

    config = EfficientRolloutConfig.from_dict({"drafter": args.drafter, "native": {"dtype": "float32", "device": "cpu"}})
    engine = NativeEngine.load("default", config)
    requests = workload(engine.tokenizer, BenchConfig(max_new_tokens=args.max_new_tokens))
    engine.generate(capped(requests, 8), seed=args.seed)  # warm-up, untimed
    controller_config = ControllerConfig.preset("efficient")
    result = engine.generate(requests, seed=args.seed, controller=Controller(controller_config))
    summary = result.summary()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts, t = [], 0.0
    for _, _, _, seconds, _ in result.steps:
        starts.append(t)
        t += seconds
    batch = [s[0] for s in result.steps]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for (b, speculated, gamma, seconds, _), x in zip(result.steps, starts):
        if speculated:
            ax.axvspan(x, x + seconds, color="tab:orange", alpha=0.25, lw=0)
    ax.step(starts, batch, where="post", color="tab:blue", lw=2, label="active rows")
    ax.fill_between([], [], color="tab:orange", alpha=0.25, label="speculating (int4 self-drafter)")
    gamma_ax = ax.twinx()
    gamma_ax.step(starts, [s[2] for s in result.steps], where="post", color="tab:red", lw=0.8, alpha=0.7)
    gamma_ax.set_ylabel("gamma (0 = plain step)", color="tab:red")
    gamma_ax.set_ylim(0, max(controller_config.gamma_max, 1) + 1)
    ax.set_xlabel("rollout wall time (s)")
    ax.set_ylabel("active rows")
    ax.set_ylim(0, max(batch) + 1)
    ax.set_title(f"One GRPO-like rollout on CPU: 16 rows, SmolLM2-135M fp32, drafter {engine.drafter.report.recipe}, "
                 f"preset efficient\n{summary['speculated_share']:.0%} of decode steps speculated, "
                 f"mean acceptance length {summary['mean_acceptance_length']:.2f}, rollout {summary['seconds']:.0f} s",
                 fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "active_batch.png", dpi=110)
    (args.out / "active_batch.json").write_text(json.dumps(
        {"drafter": engine.drafter.report.recipe, "summary": summary,
         "trace": [[b, s, g, round(sec, 4)] for b, s, g, sec, _ in result.steps]}) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out / 'active_batch.png'}")


if __name__ == "__main__":
    main()
