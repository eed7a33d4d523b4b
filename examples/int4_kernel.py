"""The drafter as cheap as its bytes (issue 29): the compiled int4 kernel against torchao's, on this CPU.

    .venv/bin/python examples/int4_kernel.py [--rows 1,4,16] [--drafter int4-g32] [--out docs/measured/cpu/int4_kernel]

One process, every comparison interleaved (median over ``--repeats`` rounds after two warm-ups):

1. Linears: each decoder linear shape of the model, at each row count, as the target runs it
   (oneDNN's packed GEMM, ``--dtype`` float32 or bfloat16), as the drafter ran it before (torchao's
   ``Int4OpaqueTensor``, bfloat16 activations, cast in and out of a float32 target) and on the
   compiled int4 kernel: time, bytes read / time, and that as a
   share of this machine's copy bandwidth (read + write of a 512 MiB tensor).
2. Steps (256 positions of KV): the target's one-token step, a verify of 5 tokens per row, and each
   drafter's one-token step: r = draft / target and v = verify / target, both drafters side by side.
3. Acceptance: each drafter's expected per-token acceptance at temperature 1 against the target
   (sum of min(target, draft) over the vocabulary) at every position of the target's own greedy answers
   to the bundled math prompts, each draft from a one-row decode step on the target's KV (the kernel's
   int16 path): the kernels multiply by the same int4 grid, so it should not move.

Writes ``int4_kernel.json``, ``int4_kernel.md`` and ``int4_kernel.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from step_profile import copy_bandwidth  # noqa: E402

from verl_efficientrollout.config import DrafterConfig, EfficientRolloutConfig, NativeEngineConfig  # noqa: E402
from verl_efficientrollout.data import chat_prompt_ids, math_problems  # noqa: E402
from verl_efficientrollout.drafter import build_drafter, tensor_bytes  # noqa: E402
from verl_efficientrollout.engine.cpu_kernels import decode_ops, notable_cpu_flags  # noqa: E402
from verl_efficientrollout.engine.model import KVCache  # noqa: E402
from verl_efficientrollout.engine.native import NativeEngine  # noqa: E402

CONTEXT = 256
VERIFY_TOKENS = 5


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def interleaved(runs: dict[str, callable], repeats: int) -> dict[str, float]:
    """Median seconds of each callable, the callables run in turn each round (two warm-up rounds)."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(repeats + 2):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if i >= 2:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def linears(engine: NativeEngine, drafters: dict, rows: list[int], bandwidth: float, repeats: int) -> list[dict]:
    layer = engine.target.layers[0]
    records = []
    for name in ("wqkv", "wo", "w13", "w2"):
        modules = {"target": getattr(layer, name)}
        modules.update({kernel: getattr(d.module.layers[0], name) for kernel, d in drafters.items()})
        weight_bytes = {kind: sum(tensor_bytes(t) for t in m.buffers()) + sum(tensor_bytes(p) for p in m.parameters())
                        for kind, m in modules.items()}
        weight_bytes["target"] = tensor_bytes(modules["target"].weight)
        in_features = modules["target"].in_features
        for batch in rows:
            x = torch.randn(batch, in_features).to(engine.target.dtype)
            with torch.inference_mode():
                times = interleaved({kind: (lambda m=m: m(x)) for kind, m in modules.items()}, repeats)
            for kind, seconds in times.items():
                records.append({"linear": name, "shape": list(modules["target"].weight.shape), "rows": batch,
                                "kind": kind, "us": 1e6 * seconds, "bytes": weight_bytes[kind],
                                "share_of_copy_bandwidth": weight_bytes[kind] / seconds / bandwidth})
    return records


def steps(engine: NativeEngine, drafters: dict, rows: list[int], bandwidth: float, repeats: int) -> list[dict]:
    target = engine.target
    args = target.args
    target_bytes = sum(p.numel() * p.element_size() for p in target.parameters())  # tied: counted once
    records = []
    for batch in tqdm(rows, desc="steps"):
        cache = KVCache(args, batch, CONTEXT + VERIFY_TOKENS + 1, target.dtype)
        kv_bytes = 2 * args.num_layers * args.num_kv_heads * args.head_dim * CONTEXT * cache.k.element_size() * batch
        one = (torch.zeros(batch, 1, dtype=torch.long), torch.full((batch, 1), CONTEXT))
        verify = (torch.zeros(batch, VERIFY_TOKENS, dtype=torch.long), CONTEXT + torch.arange(VERIFY_TOKENS).expand(batch, -1))
        runs = {"target": lambda: target(*one, cache, slice(0, batch), keys=CONTEXT + 1),
                "verify": lambda: target(*verify, cache, slice(0, batch), keys=CONTEXT + VERIFY_TOKENS)}
        streamed = {"target": target_bytes + kv_bytes, "verify": target_bytes + kv_bytes}
        for kernel, drafter in drafters.items():
            runs[f"draft {kernel}"] = lambda m=drafter.module: m(*one, cache, slice(0, batch), keys=CONTEXT + 1)
            streamed[f"draft {kernel}"] = drafter.report.drafter_total_bytes + kv_bytes
        with torch.inference_mode():
            times = interleaved(runs, repeats)
        for kind, seconds in times.items():
            records.append({"rows": batch, "kind": kind, "ms": 1e3 * seconds, "ratio_to_target": seconds / times["target"],
                            "share_of_copy_bandwidth": streamed[kind] / seconds / bandwidth})
    return records


def acceptance(engine: NativeEngine, drafters: dict, tokens: int, prompts: int) -> dict[str, float]:
    """Mean over positions of sum_v min(target(v), draft(v)) at temperature 1 on the target's greedy answers,
    each draft distribution from a one-row decode step on the target's KV (the shape the engine drafts in)."""
    target = engine.target
    totals = {kernel: [] for kernel in drafters}
    for problem in tqdm(math_problems()[:prompts], desc="acceptance"):
        ids = list(chat_prompt_ids(engine.tokenizer, problem))
        for _ in range(tokens):  # the target's greedy answer, one full forward per token (short; clarity first)
            cache = KVCache(target.args, 1, len(ids) + 1, target.dtype)
            with torch.inference_mode():
                logits = target(torch.tensor([ids]), torch.arange(len(ids))[None], cache, slice(0, 1))
            ids.append(int(logits[0, -1].argmax()))
        cache = KVCache(target.args, 1, len(ids), target.dtype)
        with torch.inference_mode():
            target_probs = target(torch.tensor([ids]), torch.arange(len(ids))[None], cache, slice(0, 1))[0].softmax(-1)
            for position in range(len(ids) - tokens - 1, len(ids) - 1):  # predicting each answer token
                keys, values = cache.k[:, :, :, position].clone(), cache.v[:, :, :, position].clone()
                for kernel, drafter in drafters.items():  # each writes its own K/V at the position, as in the engine
                    draft = drafter.module(torch.tensor([[ids[position]]]), torch.tensor([[position]]), cache,
                                           slice(0, 1), keys=position + 1)[0, 0].softmax(-1)
                    totals[kernel].append(float(torch.minimum(target_probs[position], draft).sum()))
                    cache.k[:, :, :, position], cache.v[:, :, :, position] = keys, values  # the target's again
    return {kernel: statistics.fmean(values) for kernel, values in totals.items()}


def markdown(report: dict) -> str:
    lines = [f"# The compiled int4 kernel against torchao's ({report['machine']})", "",
             f"CPU flags {', '.join(report['cpu_flags'])}; {report['threads']} threads; int4 kernel path "
             f"`{report['int4_isa']}`; {report['dtype']} target{' with the compiled decode ops' if report['dtype'] == 'float32' else ''}; drafter {report['drafter']}; copy "
             f"bandwidth {report['copy_bandwidth_gb_per_s']:.1f} GB/s. Command: `{report['command']}`.", "",
             "## Steps (256 positions of KV per row)", "",
             "| rows | target ms | verify of 5 ms (v) | draft, torchao ms (r) | draft, native int4 ms (r) | "
             "bandwidth share: target / torchao draft / native draft |", "|---|---|---|---|---|---|"]
    by = {(s["rows"], s["kind"]): s for s in report["steps"]}
    for batch in report["rows"]:
        t, v, a, n = (by[batch, k] for k in ("target", "verify", "draft torchao", "draft auto"))
        lines.append(f"| {batch} | {t['ms']:.2f} | {v['ms']:.2f} ({v['ratio_to_target']:.2f}) | {a['ms']:.2f} "
                     f"({a['ratio_to_target']:.2f}) | {n['ms']:.2f} ({n['ratio_to_target']:.2f}) | "
                     f"{t['share_of_copy_bandwidth']:.0%} / {a['share_of_copy_bandwidth']:.0%} / "
                     f"{n['share_of_copy_bandwidth']:.0%} |")
    lines += ["", "## Linears (microseconds; share of the copy bandwidth)", "",
              f"| linear [N, K] | rows | {report['dtype']} target | torchao int4 | native int4 |", "|---|---|---|---|---|"]
    lin = {(r["linear"], r["rows"], r["kind"]): r for r in report["linears"]}
    for name in ("wqkv", "wo", "w13", "w2"):
        for batch in report["rows"]:
            cells = [lin[name, batch, k] for k in ("target", "torchao", "auto")]
            lines.append(f"| {name} {cells[0]['shape']} | {batch} | " + " | ".join(
                f"{c['us']:.0f} ({c['share_of_copy_bandwidth']:.0%})" for c in cells) + " |")
    acc = report["acceptance"]
    lines += ["", f"## Acceptance at temperature 1 ({report['drafter']}, {report['acceptance_tokens']} greedy answer "
              f"tokens x {report['acceptance_prompts']} prompts)", "",
              f"torchao {acc['torchao']:.4f}, native int4 {acc['auto']:.4f}."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, label in (("draft torchao", "drafter, torchao int4"), ("draft auto", "drafter, native int4"),
                        ("verify", "verify of 5 tokens")):
        values = [next(s["ratio_to_target"] for s in report["steps"] if s["rows"] == b and s["kind"] == kind)
                  for b in report["rows"]]
        ax.plot(report["rows"], values, marker="o", label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("active rows")
    ax.set_ylabel("step time / target one-token step")
    ax.set_title(f"{report['drafter']} on {report['int4_isa']} ({report['machine']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--drafter", default="int4-g32")
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the target's dtype")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--acceptance-tokens", type=int, default=48)
    parser.add_argument("--acceptance-prompts", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("results/int4_kernel"))
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    config = EfficientRolloutConfig(drafter=DrafterConfig.from_name(args.drafter))
    engine = NativeEngine.load(args.model, config, NativeEngineConfig(dtype=args.dtype))
    if decode_ops() is None:
        raise SystemExit("the compiled decode ops could not be built here: nothing to compare")
    drafters = {kernel: build_drafter(engine.target, config.drafter, kernel=name)
                for kernel, name in (("torchao", "torchao"), ("auto", "native"))}  # "auto": the key of ours
    bandwidth = copy_bandwidth()
    report = {"machine": cpu_model(), "cpu_flags": notable_cpu_flags(),
              "threads": torch.get_num_threads(), "int4_isa": drafters["auto"].report.kernel,
              "drafter": config.drafter.name, "dtype": args.dtype, "copy_bandwidth_gb_per_s": bandwidth / 1e9, "rows": rows,
              "command": "python examples/int4_kernel.py " + " ".join(sys.argv[1:]),
              "drafter_reports": {k: {"kernel": d.report.kernel, "drafter_total_bytes": d.report.drafter_total_bytes,
                                      "build_seconds": d.report.build_seconds} for k, d in drafters.items()}}
    report["steps"] = steps(engine, drafters, rows, bandwidth, args.repeats)
    report["linears"] = linears(engine, drafters, rows, bandwidth, args.repeats)
    report["acceptance"] = acceptance(engine, drafters, args.acceptance_tokens, args.acceptance_prompts)
    report["acceptance_tokens"] = args.acceptance_tokens
    report["acceptance_prompts"] = len(math_problems()[:args.acceptance_prompts])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int4_kernel.json").write_text(json.dumps(report, indent=2))
    (args.out / "int4_kernel.md").write_text(markdown(report))
    plot(report, args.out / "int4_kernel.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
