"""The bundled math word problems (written for this project) and their chat prompts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

# Questions whose answers end early (median ~35 tokens with the default model): whole response
# lengths to EOS are cheap to sample many times (the engines' distribution tests).
SHORT_ANSWER_QUESTIONS = (
    "What is 7 + 5? Reply with the number only.", "Is 17 a prime number? Answer yes or no.",
    "Name the capital of France in one word.", "What is 9 times 3? Give only the number.",
)
INSTRUCTION = "Solve the problem step by step, then give the final answer as 'The answer is N.'"


@dataclass(frozen=True)
class MathProblem:
    question: str
    answer: str


def math_problems() -> list[MathProblem]:
    text = resources.files("verl_efficientrollout").joinpath("data/math_problems.jsonl").read_text()
    return [MathProblem(**json.loads(line)) for line in text.splitlines() if line.strip()]


def chat_prompt_ids(tokenizer, problem: MathProblem) -> list[int]:
    """Token ids of the chat-formatted problem, ending where the assistant starts to answer."""
    return chat_ids(tokenizer, f"{problem.question}\n{INSTRUCTION}")


def chat_ids(tokenizer, text: str) -> list[int]:
    """Token ids of one user message in the chat template, ending where the assistant answers."""
    messages = [{"role": "user", "content": text}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def agent_loop_batch(questions: list[str], samples: int):
    """verl's ``DataProto`` of single-turn chat prompts, each question ``samples`` times, as verl's
    ``AgentLoopManager.generate_sequences`` takes it (imports verl)."""
    import numpy as np
    from verl import DataProto

    prompts = [[{"role": "user", "content": q}] for q in questions for _ in range(samples)]
    return DataProto.from_dict(non_tensors={
        "raw_prompt": np.array(prompts, dtype=object),
        "data_source": np.array(["math"] * len(prompts), dtype=object),
        "agent_name": np.array(["single_turn_agent"] * len(prompts), dtype=object),
    })
