"""A few GRPO steps on CPU, through veRL and rollout.name=efficient, in a few minutes.

    python examples/grpo/cpu_grpo.py [--steps 3] [--prompts 4] [--samples 4] [--out results/cpu_grpo]

What runs is real: verl's hydra config with ``actor_rollout_ref.rollout.name=efficient``, verl's
``LLMServerManager`` starting our replica and server (a local Ray with no GPU), verl's agent loop
sending every sample to it, verl's GRPO advantage, and verl's worker-side rollout class streaming
the new weights to the server after each step (target swapped, int4 drafter rebuilt). What verl
cannot do without a GPU (its FSDP actor) is replaced by the smallest honest trainer: the default
model in float32 on CPU, one AdamW step per rollout on the policy-gradient loss with the GRPO
advantages. The reward (``--reward answer``) is answer correctness on the bundled math problems
(1.0), with 0.1 for a well-formed wrong answer ("The answer is N.") so a 135M model gets a
gradient at all; ``--reward digits`` is the share of the response's characters that are digits.
``--reward ordinal`` is for smoke tests only: the sample's index within its group (0 for the first,
1 for the last), so every group's rewards differ by construction and every step has a non-zero
advantage, whatever was sampled (it teaches the model nothing about the task).

As verl's trainer does, the trainer's weights are synced to the rollout once before the first
rollout: every step, the first included, samples exactly the policy being trained (the log-prob
gap between trainer and rollout is ~1e-6 per token at every step).

Per step it prints the reward, the rollout time, speculative decoding's acceptance (verl's own
``rollout/spec_*`` metrics), the drafter rebuild time and how far the weights moved; the table and
a plot (acceptance and reward per step) go to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ANSWER = re.compile(r"answer is\s*\$?(-?[0-9][0-9,]*(?:\.[0-9]+)?)", re.IGNORECASE)


@dataclass(frozen=True)
class StepReport:
    step: int
    reward: float  # mean over the step's samples
    correct: float  # share of samples with the right answer
    rollout_seconds: float
    response_tokens: int
    accept_rate: float  # verl's rollout/spec_accept_rate (drafted tokens accepted)
    accept_length: float  # verl's rollout/spec_accept_length (mean acceptance length, bonus counted)
    update_seconds: float  # weights streamed, committed, drafter rebuilt
    drafter_build_seconds: float
    weights_version: int
    logprob_gap: float  # mean |trainer - rollout log-prob| per token: ~0 iff the server has the trainer's weights
    weight_change: float  # relative L2 change of all weights in this step


def reward(response: str, answer: str) -> float:
    """1.0 for the right final answer, 0.1 for a well-formed wrong one, else 0."""
    match = ANSWER.search(response)
    if match is None:
        return 0.0
    return 1.0 if match.group(1).replace(",", "").rstrip(".") == answer else 0.1


def step_rewards(kind: str, texts: list[str], rows: list, samples: int) -> torch.Tensor:  # [rows]
    """The rewards of one step's responses (rows are grouped: ``samples`` consecutive rows per prompt)."""
    if kind == "answer":
        return torch.tensor([reward(t, p.answer) for t, p in zip(texts, rows)])
    if kind == "digits":
        return torch.tensor([sum(c.isdigit() for c in t) / max(len(t), 1) for t in texts])
    if kind == "ordinal":  # distinct within every group by construction
        return torch.tensor([(i % samples) / max(samples - 1, 1) for i in range(len(texts))])
    raise ValueError(f"reward must be one of answer, digits, ordinal, got {kind!r}")


def trainer_config(model_dir: str, args):
    from verl_efficientrollout.verl_adapter.dry_run import compose_trainer_config

    return compose_trainer_config([
        "algorithm.adv_estimator=grpo",
        "actor_rollout_ref.rollout.name=efficient",
        f"actor_rollout_ref.model.path={model_dir}",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.nnodes=1", "actor_rollout_ref.rollout.n_gpus_per_node=1",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        f"actor_rollout_ref.rollout.n={args.samples}",
        "actor_rollout_ref.rollout.prompt_length=256",
        f"actor_rollout_ref.rollout.response_length={args.max_new_tokens}",
        "actor_rollout_ref.rollout.temperature=1.0",
        "actor_rollout_ref.rollout.calculate_log_probs=true",
        "+actor_rollout_ref.rollout.custom={efficient: {drafter: " + args.drafter + ", controller: {preset: "
        + args.preset + "}, native: {dtype: float32, device: cpu}}}",
    ])


def prompt_batch(problems, samples: int):
    from verl import DataProto

    rows = [p for p in problems for _ in range(samples)]
    return DataProto.from_dict(non_tensors={
        "raw_prompt": np.array([[{"role": "user", "content": f"{p.question}\n{_instruction()}"}] for p in rows],
                               dtype=object),
        "data_source": np.array(["bundled_math"] * len(rows), dtype=object),
        "agent_name": np.array(["single_turn_agent"] * len(rows), dtype=object),
    }), rows


def _instruction() -> str:
    from verl_efficientrollout.data import INSTRUCTION

    return INSTRUCTION


def policy_gradient_step(policy, optimizer, output, advantages) -> tuple[float, float]:
    """One AdamW step on -advantage x log-prob ratio (token mean), old log-probs from the rollout.
    Returns the mean |trainer - rollout log-prob| per response token before the step (near 0 when
    the server serves exactly the trainer's weights) and the relative L2 change of the weights."""
    batch = output.batch
    responses = batch["responses"]  # [rows, response_len]
    mask = batch["response_mask"].float()  # [rows, response_len]
    start = int(batch["attention_mask"].argmax(-1).min())  # prompts are left-padded: drop the common padding
    hidden = policy.model(input_ids=batch["input_ids"][:, start:], attention_mask=batch["attention_mask"][:, start:],
                          position_ids=batch["position_ids"][:, start:]).last_hidden_state  # [rows, len, hidden]
    logits = policy.lm_head(hidden[:, -responses.shape[1] - 1 : -1])  # [rows, response_len, vocab]
    log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    log_ratio = log_probs - batch["rollout_log_probs"].float()
    gap = float((log_ratio.abs() * mask).sum() / mask.sum().clamp(min=1))
    loss = -(torch.exp(log_ratio) * advantages * mask).sum() / mask.sum().clamp(min=1)
    before = [p.detach().clone() for p in policy.parameters()]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    moved = sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(policy.parameters(), before))
    return gap, (moved / sum(float(b.pow(2).sum()) for b in before)) ** 0.5


def run(args) -> list[StepReport]:
    """Start a local Ray, verl's server manager (our replica and server) and agent loop, then train."""
    import ray
    from verl.experimental.agent_loop.agent_loop import AgentLoopManager
    from verl.workers.rollout.llm_server import LLMServerManager

    from verl_efficientrollout.models import default_model_dir

    model_dir = str(default_model_dir())
    config = trainer_config(model_dir, args)
    env = {k: v for k, v in os.environ.items() if k == "VERL_EFFICIENTROLLOUT_CACHE"}
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, runtime_env={"env_vars": env})
    try:
        servers = LLMServerManager.create(config)  # starts our replica and its server
        agents = AgentLoopManager.create(config, llm_client=servers.get_client())
        return train(args, agents, servers.get_replicas()[0].config, model_dir)
    finally:
        ray.shutdown()


def train(args, agents, rollout_config, model_dir: str) -> list[StepReport]:
    """``args.steps`` GRPO steps: rollout through ``agents``, reward, advantage, AdamW step, weight sync."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
    from verl.trainer.ppo.ray_trainer import compute_spec_decode_metrics
    from verl.workers.config import HFModelConfig
    from verl.workers.rollout.base import get_rollout_class

    from verl_efficientrollout.data import math_problems

    os.environ.setdefault("RANK", "0")
    sender = get_rollout_class("efficient", "async")(  # verl's worker-side weight sender
        config=rollout_config, model_config=HFModelConfig(path=model_dir), device_mesh=None)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    # verl's trainer syncs the actor's weights to the rollout before its first rollout: do the same, so
    # step 1 samples the policy being trained whatever the server served before.
    asyncio.run(sender.update_weights(iter(policy.state_dict().items()), global_steps=0))
    problems = math_problems()
    reports = []
    for step in tqdm(range(1, args.steps + 1), desc="GRPO steps", unit="step"):
        chosen = [problems[(step - 1) * args.prompts + i] for i in range(args.prompts)]
        batch, rows = prompt_batch(chosen, args.samples)
        start = time.perf_counter()
        output = agents.generate_sequences(batch)  # verl's agent loop -> our server
        rollout_seconds = time.perf_counter() - start
        mask = output.batch["response_mask"]
        texts = tokenizer.batch_decode(output.batch["responses"] * mask, skip_special_tokens=True)
        lengths = mask.sum(-1)
        rewards = step_rewards(args.reward, texts, rows, args.samples)
        token_rewards = torch.zeros(mask.shape)
        token_rewards[torch.arange(len(rows)), (lengths - 1).clamp(min=0)] = rewards
        uid = np.array([str(i // args.samples) for i in range(len(rows))], dtype=object)
        advantages, _ = compute_grpo_outcome_advantage(token_rewards, mask, uid)
        gap, change = policy_gradient_step(policy, optimizer, output, advantages)
        update = asyncio.run(sender.update_weights(iter(policy.state_dict().items()), global_steps=step))
        spec = compute_spec_decode_metrics(*(output.non_tensor_batch[k] for k in (
            "spec_num_draft_tokens", "spec_num_accepted_tokens", "spec_num_verify_steps")))
        reports.append(StepReport(
            step=step, reward=float(rewards.mean()), correct=float((rewards == 1.0).float().mean()),
            rollout_seconds=rollout_seconds, response_tokens=int(lengths.sum()),
            accept_rate=float(spec.get("rollout/spec_accept_rate", float("nan"))),
            accept_length=float(spec.get("rollout/spec_accept_length", float("nan"))),
            update_seconds=float(update["update_seconds"]),
            drafter_build_seconds=float(update["drafter_build_seconds"] or float("nan")),
            weights_version=int(update["weights_version"]), logprob_gap=gap, weight_change=change))
        tqdm.write(format_row(reports[-1]))
    return reports


HEADER = ("step  reward  correct  rollout_s  tokens  accept_rate  accept_len  update_s  drafter_s  version  "
          "logp_gap  dW/W")


def format_row(r: StepReport) -> str:
    return (f"{r.step:>4}  {r.reward:>6.3f}  {r.correct:>7.3f}  {r.rollout_seconds:>9.1f}  {r.response_tokens:>6}  "
            f"{r.accept_rate:>11.3f}  {r.accept_length:>10.2f}  {r.update_seconds:>8.2f}  "
            f"{r.drafter_build_seconds:>9.2f}  {r.weights_version:>7}  {r.logprob_gap:>8.1e}  {r.weight_change:.2e}")


def save(reports: list[StepReport], args, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_grpo.json").write_text(json.dumps(
        {"settings": vars(args) | {"out": str(args.out)}, "steps": [asdict(r) for r in reports]}, indent=2) + "\n")
    steps = [r.step for r in reports]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r.accept_rate for r in reports], "o-", label="draft acceptance (drafter rebuilt each step)")
    ax.plot(steps, [r.reward for r in reports], "s--", label="mean reward")
    ax.set_xlabel("GRPO step (weights updated after each)")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(steps)
    ax.set_title(f"CPU GRPO, SmolLM2-135M, drafter {args.drafter}, preset {args.preset}, reward {args.reward}",
                 fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "cpu_grpo.png", dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (bundled math problems)")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (GRPO group size)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--drafter", default="int4-g32", help="drafter recipe, e.g. int4-g32, int4-g64")
    parser.add_argument("--preset", default="efficient", help="controller preset: efficient, sd-always, paper, ar")
    parser.add_argument("--reward", default="answer", choices=("answer", "digits", "ordinal"),
                        help="answer: correctness (0.1 for a well-formed wrong answer); digits: share of digit "
                             "characters; ordinal: the sample's index in its group (smoke tests: a gradient by "
                             "construction)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/cpu_grpo"))
    args = parser.parse_args(argv)
    if args.samples < 2:
        parser.error(f"--samples must be >= 2 (GRPO's advantage compares samples of one prompt), got {args.samples}")
    if args.steps * args.prompts > 32:
        parser.error(f"--steps x --prompts must be <= 32 (the bundled problems), got {args.steps * args.prompts}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    reports = run(args)
    print(HEADER)
    for r in reports:
        print(format_row(r))
    save(reports, args, args.out)
    print(f"wrote {args.out / 'cpu_grpo.json'} and {args.out / 'cpu_grpo.png'}")


if __name__ == "__main__":
    main()
