"""The real veRL stack on CPU, in a local Ray with no GPUs: verl's LLMServerManager launches our
replica, verl's agent loop (single turn) drives our server, and the worker-side adapter streams a
policy update to it as verl's checkpoint engine hands it over (a name -> tensor generator); then
examples/grpo/cpu_grpo.py trains two GRPO steps through the same stack."""

from __future__ import annotations

import asyncio
import os

import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]

UPDATE = 0.25  # the policy update: noise of 0.25 x std on every decoder linear


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    env = {k: v for k, v in os.environ.items() if k == "VERL_EFFICIENTROLLOUT_CACHE"}
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def trainer_config(default_model_dir):
    from verl_efficientrollout.verl_adapter.dry_run import compose_trainer_config

    return compose_trainer_config([
        "algorithm.adv_estimator=grpo",
        "actor_rollout_ref.rollout.name=efficient",
        f"actor_rollout_ref.model.path={default_model_dir}",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.nnodes=1", "actor_rollout_ref.rollout.n_gpus_per_node=1",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "actor_rollout_ref.rollout.prompt_length=256", "actor_rollout_ref.rollout.response_length=48",
        "actor_rollout_ref.rollout.calculate_log_probs=true",
        "+actor_rollout_ref.rollout.custom={efficient: {drafter: int4-g32, "
        "controller: {preset: sd-always, gamma: 4}, native: {dtype: float32, device: cpu}}}",
    ])


@pytest.fixture(scope="module")
def servers(ray_cluster, trainer_config):
    from verl.workers.rollout.llm_server import LLMServerManager

    return LLMServerManager.create(trainer_config)


@pytest.fixture(scope="module")
def agents(servers, trainer_config):
    from verl.experimental.agent_loop.agent_loop import AgentLoopManager

    return AgentLoopManager.create(trainer_config, llm_client=servers.get_client())


@pytest.fixture(scope="module")
def weight_sender(servers, default_model_dir):
    """verl's worker-side rollout class, which streams weights to the module's server."""
    from verl.workers.config import HFModelConfig
    from verl.workers.rollout.base import get_rollout_class

    os.environ.setdefault("RANK", "0")
    return get_rollout_class("efficient", "async")(
        config=servers.get_replicas()[0].config, model_config=HFModelConfig(path=default_model_dir), device_mesh=None)


@pytest.fixture
def restores_default_weights(weight_sender, original_weights):
    """The module's server is shared: a test that changes its weights gets the default model's back
    afterwards, whatever it did and however it ended."""
    yield
    asyncio.run(weight_sender.update_weights(iter(original_weights.items()), global_steps=0))


def _spec_metrics(output) -> dict:
    from verl.trainer.ppo.ray_trainer import compute_spec_decode_metrics

    batch = output.non_tensor_batch
    return compute_spec_decode_metrics(batch["spec_num_draft_tokens"], batch["spec_num_accepted_tokens"],
                                       batch["spec_num_verify_steps"])


def test_verl_agent_loop_and_weight_sync_run_on_the_efficient_server(servers, agents, trainer_config,
                                                                     default_model_dir, weight_sender,
                                                                     restores_default_weights):
    import ray

    from verl_efficientrollout.bench import policy_update
    from verl_efficientrollout.data import agent_loop_batch, math_problems
    from verl_efficientrollout.engine.native import NativeEngine
    from verl_efficientrollout.verl_adapter.config import efficient_config
    from verl_efficientrollout.verl_adapter.rollout import EfficientReplica

    assert isinstance(servers.get_replicas()[0], EfficientReplica)
    batch = agent_loop_batch([p.question for p in math_problems()[:4]], samples=2)

    output = agents.generate_sequences(batch)  # verl's agent loop -> router -> our server
    assert output.batch["responses"].shape == (8, 48)
    log_probs = output.batch["rollout_log_probs"][output.batch["response_mask"].bool()]
    assert log_probs.numel() > 0 and bool((log_probs <= 0).all())
    before = _spec_metrics(output)  # what verl's trainer logs as rollout/spec_accept_rate, _length
    assert before["rollout/spec_accept_rate"] > 0.8 and before["rollout/spec_accept_length"] > 2

    # The policy update, as verl's checkpoint engine hands it to the worker-side adapter.
    rollout_config = servers.get_replicas()[0].config
    engine = NativeEngine.load(default_model_dir, efficient_config(rollout_config))
    state = policy_update(engine.target.hf_state_dict(), UPDATE, seed=7)
    partial = ((n, t) for n, t in state.items() if "layers.2." not in n)
    with pytest.raises(ray.exceptions.RayTaskError, match="missing"):
        asyncio.run(weight_sender.update_weights(partial, global_steps=1))
    report = asyncio.run(weight_sender.update_weights(iter(state.items()), global_steps=1))
    assert report["drafter_build_seconds"] > 0
    rebuilt = _spec_metrics(agents.generate_sequences(batch))["rollout/spec_accept_rate"]
    # The stale level for comparison: the same update with the drafter left as it was.
    stale_drafter = engine.drafter
    engine.update_weights(state.items())
    engine.drafter = stale_drafter
    stale = _stale_acceptance(engine, trainer_config, batch)
    assert rebuilt > stale + 0.08, (rebuilt, stale)


def _stale_acceptance(engine, trainer_config, batch) -> float:
    """Acceptance of the same workload on the updated target with the pre-update drafter."""
    from transformers import AutoTokenizer

    from verl_efficientrollout.config import SamplingParams
    from verl_efficientrollout.controller import Controller, ControllerConfig
    from verl_efficientrollout.engine.base import Request

    tokenizer = AutoTokenizer.from_pretrained(trainer_config.actor_rollout_ref.model.path)
    requests = [
        Request(tuple(tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=True)["input_ids"]),
                48, SamplingParams(1.0))
        for p in batch.non_tensor_batch["raw_prompt"]
    ]
    result = engine.generate(requests, seed=0, controller=Controller(ControllerConfig.preset("sd-always", gamma=4)))
    drafted = sum(o.num_draft_tokens for o in result.outputs)
    return sum(o.num_accepted_tokens for o in result.outputs) / drafted


def test_cpu_grpo_example_rebuilds_the_drafter_and_serves_each_updated_policy(servers, agents, default_model_dir,
                                                                              load_example, restores_default_weights):
    grpo = load_example("grpo/cpu_grpo.py")
    # The ordinal reward differs within every group by construction: each step has a gradient.
    args = grpo.parse_args(["--steps", "2", "--prompts", "2", "--samples", "4", "--reward", "ordinal", "--lr", "1e-4"])
    steps = grpo.train(args, agents, servers.get_replicas()[0].config, default_model_dir)
    assert steps[1].weights_version == steps[0].weights_version + 1, steps  # synced after each step
    assert all(s.weight_change > 0 for s in steps), steps  # a real gradient step each time
    assert all(s.drafter_build_seconds > 0 for s in steps), steps
    # The trainer's weights reach the server before the first rollout and after each step: every step
    # samples the policy being trained (log-probs match the trainer's), and the drafter rebuilt from
    # them (int4-asym-g32) is accepted as usual.
    assert all(s.logprob_gap < 1e-3 for s in steps), steps
    assert all(s.accept_rate > 0.8 for s in steps), steps


def test_cpu_grpo_ordinal_reward_differs_within_every_group_and_bad_arguments_are_refused(load_example):
    grpo = load_example("grpo/cpu_grpo.py")
    rewards = grpo.step_rewards("ordinal", ["same text"] * 8, [None] * 8, samples=4)
    assert rewards.tolist() == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0] * 2)
    with pytest.raises(SystemExit):
        grpo.parse_args(["--samples", "1"])  # GRPO needs a group


def test_cpu_grpo_reward_is_correctness_with_a_small_credit_for_a_well_formed_answer(load_example):
    reward = load_example("grpo/cpu_grpo.py").reward
    assert reward("3 + 4 = 7. The answer is 7.", "7") == 1.0
    assert reward("The answer is 1,200.", "1200") == 1.0
    assert reward("The answer is 8.", "7") == 0.1
    assert reward("I think 7", "7") == 0.0
