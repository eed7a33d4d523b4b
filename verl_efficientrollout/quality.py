"""Drafter quality report: how close each int4 self-drafter recipe is to its target, and how cheap.

For every recipe it reports, on target samples of the bundled math problems:

* per-token acceptance = 1 - total variation between target and drafter next-token distributions,
  teacher-forced on the target's own samples (the probability that the rejection sampler accepts
  a draft token), at each temperature;
* greedy agreement (argmax equal), mean acceptance length for gamma=4 if positions were i.i.d.;
* drafter bytes vs target bytes, build seconds;
* step costs at several batch sizes: one target decode token, one drafter decode token and one
  verify forward of gamma+1 tokens, all on the same (shared) KV cache at a fixed context length,
  giving r = draft/target and v = verify/target.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from verl_efficientrollout.config import DrafterConfig, SamplingParams
from verl_efficientrollout.data import chat_prompt_ids, math_problems
from verl_efficientrollout.drafter import build_drafter
from verl_efficientrollout.models import load_target, resolve_model
from verl_efficientrollout.reports import save_report
from verl_efficientrollout.sampling import logits_to_probs, sample, sampling_tensors


@dataclass(frozen=True)
class QualityConfig:
    model: str = "default"
    dtype: str = "bfloat16"
    recipes: tuple[str, ...] = ("int4-g32", "int4-g64")
    temperatures: tuple[float, ...] = (1.0, 0.6)
    num_problems: int = 4
    samples_per_problem: int = 4
    max_new_tokens: int = 96
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    context: int = 256
    gamma: int = 4
    repeats: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        from verl_efficientrollout._validate import check_float, check_int

        for recipe in self.recipes:
            DrafterConfig.from_name(recipe)
        if not self.recipes:
            raise ValueError("QualityConfig.recipes must name at least one recipe, got ()")
        for t in self.temperatures:
            check_float("QualityConfig", "temperatures", t, low=0.0, low_open=True)
        check_int("QualityConfig", "num_problems", self.num_problems, low=1, high=len(math_problems()))
        check_int("QualityConfig", "samples_per_problem", self.samples_per_problem, low=1)
        check_int("QualityConfig", "max_new_tokens", self.max_new_tokens, low=1)
        for b in self.batch_sizes:
            check_int("QualityConfig", "batch_sizes", b, low=1)
        check_int("QualityConfig", "context", self.context, low=1)
        check_int("QualityConfig", "gamma", self.gamma, low=1)
        check_int("QualityConfig", "repeats", self.repeats, low=1)


@dataclass
class RecipeQuality:
    recipe: str
    drafter: dict
    acceptance: dict[str, float] = field(default_factory=dict)  # temperature -> 1 - mean TV
    greedy_agreement: float = 0.0
    tokens_scored: dict[str, int] = field(default_factory=dict)
    step_costs: list[dict] = field(default_factory=list)

    def mean_acceptance_length(self, temperature: str, gamma: int) -> float:
        a = self.acceptance[temperature]
        return sum(a**k for k in range(gamma + 1))


@torch.inference_mode()
def sample_responses(
    model, prompt_ids: list[int], num_samples: int, max_new_tokens: int, params: SamplingParams, eos_id: int,
    generator: torch.Generator,
) -> tuple[list[list[int]], torch.Tensor]:
    """Plain batched sampling of one prompt; each response ends at (and includes) EOS or the cap.

    Also returns the target logits that predicted each response token, ``[samples, steps, vocab]``
    float32 (teacher forcing for free: the scoring pass then only runs the drafters).
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    input_ids = torch.tensor([prompt_ids] * num_samples, device=device)  # [samples, prompt_len]
    logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    temperature, top_k, top_p = sampling_tensors([params] * num_samples, device)
    done = torch.zeros(num_samples, dtype=torch.bool, device=device)
    tokens, all_logits = [], []
    for _ in range(max_new_tokens):
        logits = logits.float()  # [samples, vocab]
        all_logits.append(logits)
        token = sample(logits_to_probs(logits, temperature, top_k, top_p), generator)  # [samples]
        token = torch.where(done, eos_id, token)
        tokens.append(token)
        done |= token == eos_id
        if bool(done.all()):
            break
        logits = model(input_ids=token[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
    rows = torch.stack(tokens, dim=1).tolist()
    responses = [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]
    return responses, torch.stack(all_logits, dim=1)


@torch.inference_mode()
def response_logits(model, prompt_ids: list[int], responses: list[list[int]], pad_id: int):
    """Teacher-forced logits predicting each response token: ([n, max_len, vocab], mask [n, max_len])."""
    device = next(model.parameters()).device
    longest = max(len(r) for r in responses)
    ids = torch.full((len(responses), len(prompt_ids) + longest), pad_id, device=device)
    mask = torch.zeros(len(responses), longest, dtype=torch.bool, device=device)
    for i, response in enumerate(responses):
        ids[i, : len(prompt_ids) + len(response)] = torch.tensor(prompt_ids + response)
        mask[i, : len(response)] = True
    # Keep the positions from the prompt's last token on; right padding never affects earlier
    # positions of a causal LM.
    logits = model(input_ids=ids, logits_to_keep=longest + 1).logits[:, :longest].float()
    return logits, mask


@torch.inference_mode()
def step_costs(target, drafter, batch_size: int, context: int, gamma: int, repeats: int) -> dict:
    """Median seconds of target / drafter / verify forwards on one shared KV cache (random KV)."""
    from transformers import DynamicCache

    config, device = target.config, next(target.parameters()).device
    dtype = next(target.parameters()).dtype
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache = DynamicCache(config=config)
    kv_shape = (batch_size, config.num_key_value_heads, context, head_dim)
    for layer in range(config.num_hidden_layers):
        cache.update(torch.randn(kv_shape, dtype=dtype), torch.randn(kv_shape, dtype=dtype), layer)
    one = torch.randint(config.vocab_size, (batch_size, 1), device=device)
    many = torch.randint(config.vocab_size, (batch_size, gamma + 1), device=device)

    def run(model, ids) -> float:
        positions = torch.arange(context, context + ids.shape[1], device=device)
        start = time.perf_counter()
        model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=positions)
        seconds = time.perf_counter() - start
        cache.crop(context)
        return seconds

    times = {"target": [], "draft": [], "verify": []}
    for i in range(repeats + 1):  # interleaved; the first round warms up
        for kind, model, ids in (("target", target, one), ("draft", drafter, one), ("verify", target, many)):
            seconds = run(model, ids)
            if i:
                times[kind].append(seconds)
    median = {kind: statistics.median(values) for kind, values in times.items()}
    return {
        "batch": batch_size,
        "context": context,
        "gamma": gamma,
        "target_ms": 1e3 * median["target"],
        "draft_ms": 1e3 * median["draft"],
        "verify_ms": 1e3 * median["verify"],
        "r": median["draft"] / median["target"],
        "v": median["verify"] / median["target"],
    }


def run_quality(config: QualityConfig, out_dir: Path | None = None) -> dict:
    model_dir = resolve_model(config.model)
    target, tokenizer = load_target(model_dir, dtype=config.dtype)
    eos_id = tokenizer.eos_token_id
    problems = math_problems()[: config.num_problems]
    generator = torch.Generator().manual_seed(config.seed)

    samples = {}  # temperature -> list of (prompt_ids, responses)
    for temperature in config.temperatures:
        params = SamplingParams(temperature=temperature)
        for problem in tqdm(problems, desc=f"target samples, T={temperature}", leave=False):
            prompt = chat_prompt_ids(tokenizer, problem)
            responses, logits = sample_responses(
                target, prompt, config.samples_per_problem, config.max_new_tokens, params, eos_id, generator
            )
            samples.setdefault(temperature, []).append((prompt, responses, logits))

    drafters = [build_drafter(target, DrafterConfig.from_name(name)) for name in config.recipes]
    results = [RecipeQuality(recipe=d.report.recipe, drafter=asdict(d.report)) for d in drafters]
    for temperature, groups in samples.items():
        sums = [[0.0, 0, 0] for _ in drafters]  # accepted mass, greedy agreements, tokens
        for prompt, responses, sampled_logits in tqdm(groups, desc=f"scoring drafters, T={temperature}", leave=False):
            longest = max(len(r) for r in responses)
            target_logits = sampled_logits[:, :longest]  # [n, len, vocab], from the sampling pass
            params = sampling_tensors([SamplingParams(temperature=temperature)] * len(responses))
            target_probs = logits_to_probs(target_logits, *params)  # [n, len, vocab]
            target_argmax = target_logits.argmax(-1)
            for drafter, acc in zip(drafters, sums):
                draft_logits, mask = response_logits(drafter.module, prompt, responses, eos_id)
                tv = 0.5 * (target_probs - logits_to_probs(draft_logits, *params)).abs().sum(-1)  # [n, len]
                acc[0] += float((1 - tv)[mask].sum())
                acc[1] += int((target_argmax == draft_logits.argmax(-1))[mask].sum())
                acc[2] += int(mask.sum())
        for quality, (accepted_mass, agree, count) in zip(results, sums):
            quality.acceptance[str(temperature)] = accepted_mass / count
            quality.tokens_scored[str(temperature)] = count
            if temperature == config.temperatures[0]:
                quality.greedy_agreement = agree / count
    for drafter, quality in zip(drafters, results):
        for batch in tqdm(config.batch_sizes, desc=f"{quality.recipe}: step costs", leave=False):
            quality.step_costs.append(
                step_costs(target, drafter.module, batch, config.context, config.gamma, config.repeats)
            )

    import torchao

    report = {
        "model": str(model_dir),
        "dtype": config.dtype,
        "config": asdict(config),
        "environment": {
            "torch": torch.__version__,
            "torchao": torchao.__version__,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
        "responses": {
            str(t): [len(r) for _, responses, _ in groups for r in responses] for t, groups in samples.items()
        },
        "recipes": [asdict(q) for q in results],
    }
    save_report(report, out_dir, "quality", plot_quality)
    return report


def format_quality(report: dict) -> str:
    lines = [f"model {report['model']} ({report['dtype']}), torch {report['environment']['torch']}, "
             f"torchao {report['environment']['torchao']}, {report['environment']['threads']} threads, "
             f"CPU kernels {report['environment']['cpu_capability']}"]
    temps = list(report["recipes"][0]["acceptance"])
    head = "| recipe | " + " | ".join(f"acceptance T={t}" for t in temps)
    head += " | greedy agreement | drafter MB (own + shared) | target MB | build s |"
    lines += ["", head, "|" + " --- |" * (head.count("|") - 1)]
    for q in report["recipes"]:
        d = q["drafter"]
        accept = " | ".join(f"{q['acceptance'][t]:.3f}" for t in temps)
        lines.append(
            f"| {q['recipe']} | {accept} | {q['greedy_agreement']:.3f} | "
            f"{d['drafter_bytes'] / 1e6:.1f} + {d['shared_bytes'] / 1e6:.1f} | {d['target_bytes'] / 1e6:.1f} | "
            f"{d['build_seconds']:.2f} |"
        )
    lines += ["", "| recipe | batch | target ms | draft ms | verify ms (gamma+1 tokens) | r | v |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for q in report["recipes"]:
        for c in q["step_costs"]:
            lines.append(
                f"| {q['recipe']} | {c['batch']} | {c['target_ms']:.1f} | {c['draft_ms']:.1f} | "
                f"{c['verify_ms']:.1f} | {c['r']:.2f} | {c['v']:.2f} |"
            )
    return "\n".join(lines)


def plot_quality(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = report["recipes"]
    temps = list(recipes[0]["acceptance"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / (len(temps) + 1)
    for j, label in enumerate([f"acceptance T={t}" for t in temps] + ["greedy agreement"]):
        values = [q["acceptance"][temps[j]] if j < len(temps) else q["greedy_agreement"] for q in recipes]
        bars = left.bar([i + j * width for i in range(len(recipes))], values, width, label=label)
        left.bar_label(bars, fmt="%.3f", fontsize=7)
    left.set_xticks([i + width * len(temps) / 2 for i in range(len(recipes))], [q["recipe"] for q in recipes])
    left.set_ylim(0, 1.1)
    left.set_title("drafter vs target, teacher-forced on target samples")
    left.legend(loc="lower left", fontsize=8)
    for q in recipes:
        batches = [c["batch"] for c in q["step_costs"]]
        right.plot(batches, [c["r"] for c in q["step_costs"]], "o-", label=f"r = draft/target, {q['recipe']}")
    c0 = recipes[0]["step_costs"]
    right.plot([c["batch"] for c in c0], [c["v"] for c in c0], "s--", color="gray", label="v = verify/target")
    right.axhline(1.0, color="black", linewidth=0.5)
    right.set_xscale("log", base=2)
    right.set_xlabel("active batch")
    right.set_title(f"step cost ratios (context {c0[0]['context']}, gamma {c0[0]['gamma']})")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
