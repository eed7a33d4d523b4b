"""What only a GPU shows: the CUDA int4 drafter route (torchao tinygemm), its step costs, and
losslessness there. Run on a CUDA machine (the CPU suite cannot reach this route):

    python examples/gpu_report.py --section shapes --out OUT    # random-weight 1.5B / 7B shapes
    python examples/gpu_report.py --section default --out OUT   # the default model

``shapes``: Qwen2-1.5B- and Qwen2-7B-shaped models with random weights (no download), bf16
target, int4-g32 and int4-g128 drafters: step costs at 1..64 active rows. Step cost does not
depend on the weights' values, so these are the roofline inputs of a real model of that shape.
``default``: the bundled default model: greedy output of speculative vs plain decoding (fp32 and
bf16 targets), acceptance per draft position at temperature 1 (int4-g32, on the GGUF's grid, and
int4-g128, off it), and step costs. Each section writes OUT/gpu_<section>.json and .md.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_costs import GAMMAS, cost_table  # noqa: E402

from verl_efficientrollout.bench import describe_device  # noqa: E402
from verl_efficientrollout.config import DrafterConfig, EfficientRolloutConfig, SamplingParams  # noqa: E402
from verl_efficientrollout.controller import Controller, ControllerConfig  # noqa: E402
from verl_efficientrollout.drafter import build_drafter  # noqa: E402
from verl_efficientrollout.engine.base import Request  # noqa: E402
from verl_efficientrollout.engine.native import NativeEngine, NativeEngineConfig  # noqa: E402

DEVICE = "cuda"
BATCHES = [1, 2, 4, 8, 16, 32, 64]
SHAPES = {  # Qwen2 configs of that size (vocab, hidden, layers, heads, kv heads, intermediate, tied)
    "qwen2-1.5b-shape": (151936, 1536, 28, 12, 2, 8960, True),
    "qwen2-7b-shape": (152064, 3584, 28, 28, 4, 18944, False),
}
RECIPES = {"shapes": ("int4-g32", "int4-g128"),  # every linear of those shapes divides by 128
           "default": ("int4-g32", "int4-g64")}  # on the GGUF's group-32 grid, and off it (576 % 128 != 0)


def gib(n: int) -> float:
    return round(n / 2**30, 3)


def step_costs(engine: NativeEngine, context: int, recipes, lines: list[str], record: dict) -> None:
    for recipe in recipes:
        engine.drafter = build_drafter(engine.target, DrafterConfig.from_name(recipe))
        costs = engine.measure_step_costs(BATCHES, context, gammas=GAMMAS, repeats=5)
        report = engine.drafter.report
        record[recipe] = {"costs": costs, "drafter_gib": gib(report.drafter_total_bytes),
                          "target_gib": gib(report.target_bytes), "build_seconds": report.build_seconds}
        lines += [f"\n{recipe} drafter ({record[recipe]['drafter_gib']} GiB vs target "
                  f"{record[recipe]['target_gib']} GiB, built in {report.build_seconds:.1f} s), context {context}:",
                  cost_table(costs, BATCHES)]


def shapes(out: Path) -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config

    lines, record = [f"# Step costs on {describe_device(DEVICE)}"], {}
    for name, (vocab, hidden, layers, heads, kv, inter, tied) in SHAPES.items():
        config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=kv, intermediate_size=inter, tie_word_embeddings=tied,
                             max_position_embeddings=4096)
        torch.manual_seed(0)
        with torch.device(DEVICE):
            hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        engine = NativeEngine(hf_model, EfficientRolloutConfig(),
                              NativeEngineConfig(dtype="bfloat16", device=DEVICE, max_model_len=1024))
        del hf_model
        torch.cuda.empty_cache()
        lines.append(f"\n## {name}, bf16 target, random weights")
        record[name] = {}
        step_costs(engine, 512, RECIPES["shapes"], lines, record[name])
        del engine
        torch.cuda.empty_cache()
    write(out, "shapes", lines, record)


def default_model(out: Path) -> None:
    from transformers import AutoTokenizer

    from verl_efficientrollout.data import chat_prompt_ids, math_problems
    from verl_efficientrollout.models import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    prompts = [tuple(chat_prompt_ids(tokenizer, p)) for p in math_problems()[:16]]
    lines, record = [f"# The default model on {describe_device(DEVICE)}"], {}
    sd = ControllerConfig.preset("sd-always", gamma=4)
    for dtype in ("float32", "bfloat16"):
        engine = NativeEngine.load("default", EfficientRolloutConfig(drafter=DrafterConfig.from_name("int4-g32")),
                                   NativeEngineConfig(dtype=dtype, device=DEVICE))
        greedy = [Request(p, 128, SamplingParams(0.0)) for p in prompts]
        plain = engine.generate(greedy, controller=Controller(ControllerConfig.preset("ar")))
        spec = engine.generate(greedy, controller=Controller(sd))
        # Control: plain decoding of each prompt alone vs in the batch (same tokens, other GEMM shapes).
        alone = [engine.generate([r], controller=Controller(ControllerConfig.preset("ar"))).outputs[0] for r in greedy]
        for name, other in (("speculative (int4-g32, gamma 4)", spec.outputs), ("plain, one row at a time", alone)):
            first_diff = [first_difference(x.token_ids, y.token_ids) for x, y in zip(plain.outputs, other)]
            identical = sum(d is None for d in first_diff)
            record[f"greedy_{dtype}_{name}"] = {"identical_rows": identical, "first_difference": first_diff}
            lines.append(f"\ngreedy, {dtype} target, 128 tokens, {name} vs plain batched: {identical}/{len(prompts)} "
                         f"rows identical (first differing position per row: {first_diff})")
        if dtype == "float32":
            del engine
            continue
        sampled = [Request(p, 128, SamplingParams(1.0)) for p in prompts for _ in range(4)]
        for recipe in RECIPES["default"]:
            engine.drafter = build_drafter(engine.target, DrafterConfig.from_name(recipe))
            result = engine.generate(sampled, seed=1, controller=Controller(sd))
            per_position = [round(a / d, 3) for a, d in zip(result.accepted_per_position, result.drafted_per_position)]
            record[f"acceptance_{recipe}"] = {"per_position": per_position,
                                              "token_acceptance": result.controller["token_acceptance"]}
            lines.append(f"\ntemperature 1, bf16 target, {recipe} drafter, gamma 4, {len(sampled)} rows x 128 tokens: "
                         f"acceptance per position {per_position}")
        lines.append("\n## Step costs, default model, bf16 target")
        record["costs"] = {}
        step_costs(engine, 300, RECIPES["default"], lines, record["costs"])
    write(out, "default", lines, record)


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def write(out: Path, section: str, lines: list[str], record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    print(text, flush=True)
    (out / f"gpu_{section}.md").write_text(text + "\n")
    (out / f"gpu_{section}.json").write_text(json.dumps(record, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=("shapes", "default"), required=True)
    parser.add_argument("--out", type=Path, default=Path("results/gpu"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_report.py needs a CUDA device")
    (shapes if args.section == "shapes" else default_model)(args.out)


if __name__ == "__main__":
    main()
