"""Why the 0.80x target is out of reach on a small CPU: measured step costs of the lean engine.

    python examples/step_costs.py [--drafter int4-g32] [--context 300] [--dtype float32] [--device cpu]

For each active batch size: a one-token target step, a one-token drafter step and verify
forwards of gamma + 1 tokens; the last column is the best per-token cost of a speculative step
relative to plain decoding if every draft were accepted, min over gamma of
(gamma * draft + verify) / ((gamma + 1) * target). No policy can beat it.
"""

import argparse

from verl_efficientrollout.config import DrafterConfig, EfficientRolloutConfig
from verl_efficientrollout.engine.native import NativeEngine, NativeEngineConfig

GAMMAS = (2, 4, 6)


def cost_table(costs: list[dict], batches: list[int], gammas=GAMMAS) -> str:
    """Markdown table of ``NativeEngine.measure_step_costs`` records (milliseconds)."""
    ms = {(m["kind"], m["batch"], m["gamma"]): 1e3 * m["seconds"] for m in costs}
    lines = ["| active rows | target step ms | draft step ms | verify " + "/".join(str(g + 1) for g in gammas)
             + " tokens ms | draft/target | best per-token cost vs ar at acceptance 1 |",
             "|---|---|---|---|---|---|"]
    for b in batches:
        target, draft = ms["target", b, 0], ms["draft", b, 0]
        best = min((g * draft + ms["verify", b, g]) / ((g + 1) * target) for g in gammas)
        verify = "/".join(f"{ms['verify', b, g]:.2f}" for g in gammas)
        lines.append(f"| {b} | {target:.2f} | {draft:.2f} | {verify} | {draft / target:.2f} | {best:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--drafter", default="int4-g32")
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config = EfficientRolloutConfig(drafter=DrafterConfig.from_name(args.drafter))
    engine = NativeEngine.load(args.model, config, NativeEngineConfig(dtype=args.dtype, device=args.device))
    batches = [int(b) for b in args.batches.split(",")]
    costs = engine.measure_step_costs(batches, args.context, gammas=GAMMAS, repeats=5)
    print(f"drafter {args.drafter}, context {args.context}, {args.dtype} target on {args.device}")
    print(cost_table(costs, batches))


if __name__ == "__main__":
    main()
