"""A soak of the veRL rollout server: many rollout + weight-update cycles with faults injected.

    python examples/soak.py [--seconds 180] [--model default|small] [--out results/soak]

Each cycle sends a burst of concurrent ``generate`` calls (random prompts, lengths and sampling
parameters, some of them invalid on purpose), aborts every third rollout half-way and resumes,
then pushes a weight update through ``begin/receive/commit_weights`` (every fourth one broken:
a missing tensor, a NaN, or a stream cut half-way), and once poisons the drafter's logits with
NaN (the drafter must be off after that rollout and back after the next good update). After
every cycle it checks that every request was answered (tokens, ``aborted`` or its own error),
that nothing is left queued or buffered, that the speculation counters add up (per request and
per batch: accepted <= drafted, accepted + rejected <= drafted, one rejection at most per row
and step) and that the weights version moved exactly by the good updates. It reports cycles,
faults, requests, the process's resident memory and live tensor memory after the first cycle
and at the end, and the largest KV cache a rollout held. ``tests/verl_adapter/test_soak.py``
runs it for a few seconds on a small seeded model.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

SOAK_SETTINGS = {"drafter": "int4-g32", "controller": {"preset": "efficient", "min_dwell_steps": 0},
                 "native": {"dtype": "float32", "device": "cpu", "max_model_len": 128}}


@dataclass
class SoakReport:
    cycles: int = 0
    seconds: float = 0.0
    requests: int = 0
    completed: int = 0
    aborted: int = 0
    rejected_requests: int = 0  # invalid on purpose, answered with their own error
    weight_updates: int = 0
    rejected_updates: int = 0  # missing tensor or NaN: refused, previous weights kept
    interrupted_updates: int = 0  # stream cut half-way, then sent again in full
    drafter_faults: int = 0  # NaN draft logits that fired (speculation switched off, then rebuilt)
    decode_steps: int = 0
    speculated_steps: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    rejected_tokens: int = 0
    rss_mib_first_cycle: float = 0.0
    rss_mib_end: float = 0.0
    rss_mib_cycles: list[float] = field(default_factory=list)  # after every cycle
    tensor_mib_first_cycle: float = 0.0  # bytes of every live torch tensor (what a leak would grow)
    tensor_mib_end: float = 0.0
    kv_mib_max: float = 0.0  # the KV cache after a rollout (freed at every weight update), largest seen
    problems: list[str] = field(default_factory=list)  # every broken invariant, empty when all held


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def tensor_mib() -> float:
    """Bytes held by live tensors (distinct storages), whatever the allocator keeps mapped."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance on some deprecated torch module attributes warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and not obj.is_meta]
    for obj in tensors:
        try:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensor subclasses (torchao's int4) own inner tensors
            continue
    return sum(storages.values()) / 2**20


def kv_mib(engine) -> float:
    cache = engine._cache
    return 0.0 if cache is None else (cache.k.numel() + cache.v.numel()) * cache.k.element_size() / 2**20


def small_engine():
    """A seeded random 2-layer Llama (vocab 256) behind the native engine: seconds per cycle."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from verl_efficientrollout.config import EfficientRolloutConfig
    from verl_efficientrollout.engine.native import NativeEngine

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.1)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    model.generation_config.eos_token_id = 7
    efficient = EfficientRolloutConfig.from_dict(SOAK_SETTINGS)
    return NativeEngine(model, efficient, efficient.native)


def _request(rng: random.Random, vocab: int, max_model_len: int, bad: str | None):
    prompt = [rng.randrange(8, vocab) for _ in range(rng.randint(1, 24))]
    params = {"temperature": rng.choice([0.0, 0.7, 1.0]), "top_k": rng.choice([-1, 20]),
              "top_p": rng.choice([1.0, 0.9]), "max_tokens": rng.randint(1, 32), "logprobs": rng.random() < 0.5}
    if bad == "empty":
        prompt = []
    elif bad == "too-long":
        prompt = [9] * (max_model_len + 5)
    elif bad == "temperature":
        params["temperature"] = -1.0
    elif bad == "unknown-key":
        params["best_of"] = 2
    return prompt, params


async def _cycle(server, engine, states, rng: random.Random, cycle: int, report: SoakReport, poison: bool) -> None:
    vocab, max_model_len = engine.target.args.vocab_size, server.settings.max_model_len
    count = rng.randint(1, 16)
    bad = {rng.randrange(count): rng.choice(["empty", "too-long", "temperature", "unknown-key"])} if cycle % 2 else {}
    calls = [_request(rng, vocab, max_model_len, bad.get(i)) for i in range(count)]
    seen = {"n": 0}
    if poison and engine.drafter is not None:  # the drafter's logits turn NaN from its third call on
        module = engine.drafter.module

        def nan_after_two(*args, **kwargs):
            seen["n"] += 1
            logits = type(module).forward(module, *args, **kwargs)
            return logits if seen["n"] <= 2 else torch.full_like(logits, float("nan"))

        module.forward = nan_after_two
    tasks = [asyncio.create_task(server.generate(prompt_ids=p, sampling_params=s, request_id=f"{cycle}-{i}"))
             for i, (p, s) in enumerate(calls)]
    if cycle % 3 == 2:  # abort half-way, then resume
        await asyncio.sleep(0.05)
        await server.abort_all_requests()
        await server.resume_generation()
    outputs = await asyncio.gather(*tasks, return_exceptions=True)
    report.kv_mib_max = max(report.kv_mib_max, kv_mib(engine))
    if seen["n"] > 2:  # the fault fired (the controller speculated enough): speculation must now be off
        report.drafter_faults += 1
        if engine.drafter is not None:
            report.problems.append(f"cycle {cycle}: the drafter produced NaN and is still in use")
    metrics = await server.get_metrics()
    report.requests += count
    drafted = accepted = 0
    for i, ((prompt, params), output) in enumerate(zip(calls, outputs)):
        if i in bad:
            if not isinstance(output, ValueError):
                report.problems.append(f"cycle {cycle}: invalid request ({bad[i]}) got {output!r}")
            report.rejected_requests += 1
            continue
        if isinstance(output, BaseException):
            report.problems.append(f"cycle {cycle}: valid request failed: {output!r}")
            continue
        fields = output.extra_fields
        if output.stop_reason == "aborted":
            report.aborted += 1
        else:
            report.completed += 1
            if not 1 <= len(output.token_ids) <= params["max_tokens"]:
                report.problems.append(f"cycle {cycle}: {len(output.token_ids)} tokens for max {params['max_tokens']}")
        if not 0 <= fields["spec_num_accepted_tokens"] <= fields["spec_num_draft_tokens"]:
            report.problems.append(f"cycle {cycle}: accepted > drafted in {fields}")
        drafted += fields["spec_num_draft_tokens"]
        accepted += fields["spec_num_accepted_tokens"]
    batch = {k: sum(m[k] for m in metrics) for k in ("drafted_tokens", "accepted_tokens", "rejected_tokens")}
    verify_steps = sum(o.extra_fields["spec_num_verify_steps"] for o in outputs if hasattr(o, "extra_fields"))
    if (drafted, accepted) != (batch["drafted_tokens"], batch["accepted_tokens"]):
        report.problems.append(f"cycle {cycle}: requests drafted/accepted {drafted}/{accepted} != batches {batch}")
    if not (batch["accepted_tokens"] + batch["rejected_tokens"] <= drafted and batch["rejected_tokens"] <= verify_steps):
        report.problems.append(f"cycle {cycle}: drafted {drafted} < accepted + rejected, or more rejections than "
                               f"verify steps {verify_steps}: {batch}")
    report.rejected_tokens += batch["rejected_tokens"]
    report.drafted_tokens += drafted
    report.accepted_tokens += accepted
    report.decode_steps += sum(m["steps"] for m in metrics)
    report.speculated_steps += round(sum(m["speculated_share"] * m["steps"] for m in metrics))
    report.cycles += 1

    # The weight update of this cycle; every fourth one is broken and must change nothing.
    version = engine.weights_version
    state = states[cycle % len(states)]
    fault = ("missing", "nan", "interrupted")[(cycle // 4) % 3] if cycle % 4 == 3 else None
    items = list(state.items())
    await server.begin_weights()
    if fault == "missing":
        await server.receive_weights(items[1:])
    elif fault == "nan":
        name, tensor = items[0]
        await server.receive_weights([(name, torch.full_like(tensor, float("nan")))] + items[1:])
    else:
        await server.receive_weights(items[: len(items) // 2] if fault == "interrupted" else items)
    if fault == "interrupted":  # the sender died half-way; its next update starts over and must apply cleanly
        report.interrupted_updates += 1
        await server.begin_weights()
        await server.receive_weights(items)
        fault = None
    try:
        await server.commit_weights(global_steps=cycle)
        report.weight_updates += 1
        if fault is not None:
            report.problems.append(f"cycle {cycle}: a {fault} update was accepted")
        if engine.weights_version != version + 1:
            report.problems.append(f"cycle {cycle}: weights version {engine.weights_version} after one update")
        if engine.drafter is None:
            report.problems.append(f"cycle {cycle}: no drafter after a good update (it must be rebuilt)")
    except ValueError:
        report.rejected_updates += 1
        if fault is None:
            report.problems.append(f"cycle {cycle}: a good update was rejected")
        if engine.weights_version != version:
            report.problems.append(f"cycle {cycle}: a rejected update changed the weights version")
    if server._queue or server._pending_weights or server._engine_lock.locked():
        report.problems.append(f"cycle {cycle}: left behind: queue {len(server._queue)}, "
                               f"pending {len(server._pending_weights)}, lock {server._engine_lock.locked()}")


async def _soak(server, engine, seconds: float, max_cycles: int, seed: int) -> SoakReport:
    from verl_efficientrollout.bench import policy_update

    await server.launch()
    report = SoakReport()
    base = {n: t.clone() for n, t in engine.target.hf_state_dict().items()}
    states = [policy_update(base, 0.02, seed=s) for s in range(3)]  # small moves around the start
    rng = random.Random(seed)
    start = time.perf_counter()
    cycle = 0
    while cycle < max_cycles and (cycle < 2 or time.perf_counter() - start < seconds):
        poison = cycle >= 5 and report.drafter_faults == 0  # once, in the first cycle that speculates enough
        await _cycle(server, engine, states, rng, cycle, report, poison)
        report.rss_mib_cycles.append(round(rss_mib(), 1))
        if cycle == 0:
            report.rss_mib_first_cycle, report.tensor_mib_first_cycle = rss_mib(), tensor_mib()
        cycle += 1
    report.seconds = time.perf_counter() - start
    report.rss_mib_end, report.tensor_mib_end = rss_mib(), tensor_mib()
    return report


def soak(engine, seconds: float = 180.0, max_cycles: int = 10_000, seed: int = 0) -> SoakReport:
    from verl_efficientrollout.config import EfficientRolloutConfig
    from verl_efficientrollout.verl_adapter.config import ServerSettings
    from verl_efficientrollout.verl_adapter.server import EfficientServer

    efficient = engine.config if isinstance(engine.config, EfficientRolloutConfig) else EfficientRolloutConfig()
    settings = ServerSettings(model_path="(in-process engine)", efficient=efficient, prompt_length=64,
                              response_length=32, seed=seed, batch_window_s=0.01)
    return asyncio.run(_soak(EfficientServer(settings, engine=engine), engine, seconds, max_cycles, seed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--model", default="default", choices=("default", "small"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/soak"))
    args = parser.parse_args(argv)
    if args.model == "small":
        engine = small_engine()
    else:
        from verl_efficientrollout.config import EfficientRolloutConfig
        from verl_efficientrollout.engine.native import NativeEngine

        efficient = EfficientRolloutConfig.from_dict({**SOAK_SETTINGS, "native": {**SOAK_SETTINGS["native"],
                                                                                  "max_model_len": 256}})
        engine = NativeEngine.load("default", efficient)
    report = soak(engine, args.seconds, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps({"model": args.model, **asdict(report)}, indent=2) + "\n")
    print(json.dumps({"model": args.model, **asdict(report)}, indent=2))
    if report.problems:
        raise SystemExit(f"{len(report.problems)} invariant(s) broken")


if __name__ == "__main__":
    main()
