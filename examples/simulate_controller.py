"""Replay an RL-like rollout through each controller preset with the cost model (pure Python).

    python examples/simulate_controller.py [--rows 16] [--acceptance 0.95]

Response lengths follow the shape measured on the default model at temperature 1.0 (quartiles
about 140 / 188 / 464 tokens, a quarter of the rows at the 512 cap); the "true" step costs are the
bundled CPU profile. This predicts; the engine benchmark (issue 3) measures.
"""

from __future__ import annotations

import argparse
import random

from verl_efficientrollout.controller import (
    Controller, ControllerConfig, CostModel, Trace, load_profile, simulate, simulate_ar,
)


def rl_like_lengths(rows: int, seed: int, cap: int = 512) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(min(cap, int(rng.lognormvariate(5.3, 0.55))) for _ in range(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--acceptance", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lengths = rl_like_lengths(args.rows, args.seed)
    trace = Trace(prompt_lengths=(90,) * args.rows, response_lengths=lengths, acceptance=(args.acceptance,))
    true_costs = CostModel(load_profile("cpu-smollm2-135m"), refine_rate=0.0)
    baseline = simulate_ar(trace, true_costs)
    print(f"{args.rows} rows, lengths {sorted(lengths)}, true acceptance {args.acceptance}")
    print(f"{'preset':<10} {'seconds':>8} {'ratio vs ar':>12} {'speculated':>11} gamma histogram")
    for preset in ("ar", "sd-always", "paper", "efficient"):
        overrides = {"paper_min_requests": 0} if preset == "paper" else {}
        result = simulate(trace, Controller(ControllerConfig.preset(preset, **overrides)), true_costs)
        share = result.speculated_steps / result.steps
        print(f"{preset:<10} {result.total_seconds:8.1f} {result.total_seconds / baseline.total_seconds:12.3f} "
              f"{share:11.0%} {dict(sorted(result.gamma_histogram.items()))}")


if __name__ == "__main__":
    main()
