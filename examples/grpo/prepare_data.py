"""Write the parquet files the GRPO scripts train on, in verl's RL dataset layout.

    python examples/grpo/prepare_data.py gsm8k   # -> $DATA/gsm8k/{train,test}.parquet
    python examples/grpo/prepare_data.py math    # -> $DATA/math_l3to5/{train,test}.parquet

Needs ``pip install datasets`` and access to the Hugging Face Hub (run it where you train, not
in CI). Each row has what verl's RLHFDataset and its default reward function read:
``data_source`` (picks verl's scorer: ``openai/gsm8k`` -> the GSM8K "####" scorer,
``DigitalLearningGmbH/MATH-lighteval`` -> the MATH boxed-answer scorer), ``prompt`` (chat
messages), ``ability``, ``reward_model.ground_truth`` and ``extra_info``. MATH levels 3-5 is the
paper's training set (SimpleRL-Zoo's hard split of MATH train).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

GSM8K_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
MATH_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
MATH_LEVELS = ("Level 3", "Level 4", "Level 5")


def gsm8k_row(example: dict, split: str, index: int) -> dict:
    """One GSM8K example -> one verl row; the ground truth is the number after '####'."""
    match = re.search(r"#### (\-?[0-9\.\,]+)", example["answer"])
    if match is None:
        raise ValueError(f"gsm8k {split}[{index}]: no '#### N' in the answer")
    return {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": f"{example['question']} {GSM8K_INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": match.group(1).replace(",", "")},
        "extra_info": {"split": split, "index": index},
    }


def boxed_answer(solution: str) -> str:
    """The last ``\\boxed{...}`` of a MATH solution, extracted by verl's own MATH scorer code (so the
    ground truth is what that scorer will compare against)."""
    from verl.utils.reward_score.math_reward import last_boxed_only_string, remove_boxed

    boxed = last_boxed_only_string(solution)
    if boxed is None:
        raise ValueError("no \\boxed{} in the solution")
    return remove_boxed(boxed)


def math_row(example: dict, split: str, index: int) -> dict:
    return {
        "data_source": "DigitalLearningGmbH/MATH-lighteval",
        "prompt": [{"role": "user", "content": f"{example['problem']} {MATH_INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": boxed_answer(example["solution"])},
        "extra_info": {"split": split, "index": index, "level": example["level"]},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=("gsm8k", "math"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("DATA", Path.home() / "data")))
    args = parser.parse_args(argv)
    import datasets  # only here: the rest of this file is importable (and tested) without it

    if args.dataset == "gsm8k":
        source, folder, make = ("openai/gsm8k", "main"), args.out / "gsm8k", gsm8k_row
    else:
        source, folder, make = ("DigitalLearningGmbH/MATH-lighteval", "default"), args.out / "math_l3to5", math_row
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        data = datasets.load_dataset(*source, split=split)
        if args.dataset == "math":
            data = data.filter(lambda e: e["level"] in MATH_LEVELS)
        rows = data.map(lambda e, i: make(e, split, i), with_indices=True, remove_columns=data.column_names)
        rows.to_parquet(str(folder / f"{split}.parquet"))
        print(f"wrote {folder / f'{split}.parquet'}: {len(rows)} rows")


if __name__ == "__main__":
    main()
