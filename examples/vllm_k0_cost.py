"""What "speculation off" (K = 0) still costs on vLLM's draft_model path: time, drafter forwards, KV.

    .venv-vllm/bin/python examples/vllm_k0_cost.py [--batches 1,4,16] [--tokens 64] [--out DIR]

Two engines on the same KV budget: plain vLLM, and vLLM with the int4 self-drafter whose
batch-size table schedules K = 0 at every batch (it never drafts). Each decodes the same greedy
rows (random prompt tokens, no EOS stop); the worker extension counts the draft model's forwards.
vLLM's draft model keeps a KV cache of its own and runs a forward every step to keep it in sync,
so the second engine holds fewer KV blocks and pays a drafter forward per step for nothing. The
paper's drafter reads the target's KV cache and skips itself at K = 0 (not built: see README).
"""

import argparse
import json
import random
import time
from pathlib import Path

from verl_efficientrollout.config import EfficientRolloutConfig
from verl_efficientrollout.models import resolve_model

ENGINES = {  # name -> controller settings
    "plain vLLM": {"preset": "ar"},
    "draft_model, K = 0": {"toggle": "threshold", "draft_length": "fixed", "gamma": 3, "threshold_batch_size": 0},
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
    parser.add_argument("--out", type=Path, default=Path("results/vllm_k0_cost"))
    args = parser.parse_args()
    model = str(resolve_model(args.model))
    batches = [int(b) for b in args.batches.split(",")]
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(10, 40000) for _ in range(args.prompt_tokens)]}
               for _ in range(max(batches))]
    report = {"vllm": vllm_version()[0], "drafter": args.drafter, "tokens": args.tokens, "engines": {}}
    for name, controller in ENGINES.items():
        config = EfficientRolloutConfig.from_dict({"engine": "vllm", "drafter": args.drafter, "controller": controller,
                                                   "vllm": {"max_model_len": args.prompt_tokens + args.tokens + 16,
                                                            "max_num_seqs": max(batches)}})
        engine = VLLMEngine(model, config)
        try:
            cache = engine.llm.llm_engine.vllm_config.cache_config
            params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
            run_requests(engine.llm, prompts[:1], [params])  # warm-up
            rows = {}
            for batch in batches:
                before = engine.llm.collective_rpc("efficient_count_drafter_forwards")[0]
                seconds = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    run_requests(engine.llm, prompts[:batch], [params] * batch)
                    seconds.append(time.perf_counter() - start)
                after = engine.llm.collective_rpc("efficient_count_drafter_forwards")[0]
                rows[batch] = {"seconds": min(seconds),
                               "drafter_forwards": (after["forwards"] - before["forwards"]) / args.repeats,
                               "drafter_tokens": (after["tokens"] - before["tokens"]) / args.repeats}
            report["engines"][name] = {"kv_blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
                                       "kv_tokens": cache.num_gpu_blocks * cache.block_size, "batches": rows}
        finally:
            engine.close()
    plain, k0 = (report["engines"][name] for name in ENGINES)
    print(f"vLLM {report['vllm']}, drafter {args.drafter}, {args.tokens} new tokens per row, best of {args.repeats}")
    print(f"KV cache on the same budget: plain {plain['kv_tokens']} tokens, with the draft model {k0['kv_tokens']}")
    print("| rows | plain s | K = 0 s | K = 0 / plain | drafter forwards per rollout | drafter tokens per rollout |")
    print("| --- | --- | --- | --- | --- | --- |")
    for batch in batches:
        p, k = plain["batches"][batch], k0["batches"][batch]
        print(f"| {batch} | {p['seconds']:.2f} | {k['seconds']:.2f} | {k['seconds'] / p['seconds']:.2f} | "
              f"{k['drafter_forwards']:.0f} | {k['drafter_tokens']:.0f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vllm_k0_cost.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
