"""Where a native decode step's time goes, and how close its steps come to the memory bandwidth.

    .venv/bin/python examples/step_profile.py [--dtype float32] [--tokens 64] [--out results/step_profile]

1. Host overhead: one row decodes ``--tokens`` tokens (plain decoding) under the PyTorch profiler.
   "Model kernels" are the GEMMs (dense and int4) and the attention kernel; everything else (Python,
   the dispatcher, gathers and copies, elementwise ops, sampling) is the share outside them.
2. Bandwidth: a target step in float32 and in bfloat16 and a drafter step at 1 row (256 positions of
   KV), each as bytes of weights and KV read per step / step time, against this machine's measured
   copy bandwidth (read + write of a 512 MiB tensor).

Runs on the same API before and after the host-overhead work (``dtype`` given explicitly), so the
two trees can be compared. Writes ``step_profile.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from verl_efficientrollout.config import EfficientRolloutConfig, SamplingParams
from verl_efficientrollout.controller import Controller, ControllerConfig
from verl_efficientrollout.engine.base import Request
from verl_efficientrollout.engine.model import KVCache
from verl_efficientrollout.engine.native import NativeEngine, NativeEngineConfig

# The model's own compute: GEMMs (dense, int4) and attention; the rest is overhead around them.
KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise", "aten::_weight_int4pack_mm_for_cpu",
           "aten::_weight_int4pack_mm_with_scales_and_zeros", "aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_attention_math", "aten::_scaled_dot_product_efficient_attention")


def host_overhead(engine: NativeEngine, tokens: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    request = [Request((1, 2, 3, 4, 5, 6, 7, 8), tokens, SamplingParams(temperature=1.0))]
    ar = lambda: Controller(ControllerConfig.preset("ar"))  # noqa: E731
    engine.generate(request, controller=ar())  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = engine.generate(request, controller=ar())
    step_seconds = sum(s[3] for s in result.steps)
    ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    kernel_seconds = sum(ops.get(name, 0.0) for name in KERNELS)
    top = sorted(((k, v) for k, v in ops.items() if k not in KERNELS), key=lambda kv: -kv[1])[:8]
    return {
        "steps": len(result.steps), "step_ms": 1e3 * step_seconds / len(result.steps),
        "kernel_ms": 1e3 * kernel_seconds / len(result.steps),
        "outside_kernels_share": 1 - kernel_seconds / step_seconds,
        "top_other_ops_ms_per_step": {k: 1e3 * v / len(result.steps) for k, v in top},
    }


def copy_bandwidth(gib: float = 0.5, repeats: int = 5) -> float:
    """Bytes per second read + written by a large tensor copy (the machine's practical bandwidth)."""
    source = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    target = torch.empty_like(source)
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        target.copy_(source)
        seconds.append(time.perf_counter() - start)
    return 2 * source.numel() * 4 / statistics.median(seconds[1:])


def bandwidth_fraction(model: str, context: int = 256, repeats: int = 9) -> list[dict]:
    bandwidth = copy_bandwidth()
    rows = []
    for dtype in ("float32", "bfloat16"):
        engine = NativeEngine.load(model, EfficientRolloutConfig(), NativeEngineConfig(dtype=dtype))
        args = engine.target.args
        cache = KVCache(args, 1, context + 1, engine.target.dtype)
        kv_bytes = 2 * args.num_layers * args.num_kv_heads * args.head_dim * context * cache.k.element_size()
        tokens, positions = torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), context)
        target_bytes = sum(p.numel() * p.element_size() for p in engine.target.parameters())  # tied: counted once
        modules = [("target", engine.target, target_bytes)]
        if engine.drafter is not None:
            modules.append(("drafter " + engine.drafter.report.recipe, engine.drafter.module,
                            engine.drafter.report.drafter_total_bytes))
        with torch.inference_mode():
            for name, module, weight_bytes in modules:
                seconds = []
                for _ in range(repeats + 2):
                    start = time.perf_counter()
                    module(tokens, positions, cache, torch.zeros(1, dtype=torch.long))
                    seconds.append(time.perf_counter() - start)
                step = statistics.median(seconds[2:])
                rows.append({"dtype": dtype, "module": name, "step_ms": 1e3 * step, "weight_bytes": weight_bytes,
                             "kv_bytes": kv_bytes, "gb_per_s": (weight_bytes + kv_bytes) / step / 1e9,
                             "bandwidth_gb_per_s": bandwidth / 1e9,
                             "fraction_of_bandwidth": (weight_bytes + kv_bytes) / step / bandwidth})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--skip-bandwidth", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results/step_profile"))
    args = parser.parse_args()
    engine = NativeEngine.load(args.model, EfficientRolloutConfig(), NativeEngineConfig(dtype=args.dtype))
    report = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
              "dtype": args.dtype, "host_overhead_1_row": host_overhead(engine, args.tokens)}
    del engine
    if not args.skip_bandwidth:
        report["bandwidth_1_row"] = bandwidth_fraction(args.model)
    h = report["host_overhead_1_row"]
    print(f"{report['cpu_capability']}, {report['threads']} threads, {args.dtype}: 1-row step {h['step_ms']:.1f} ms, "
          f"model kernels {h['kernel_ms']:.1f} ms, outside them {h['outside_kernels_share']:.1%}")
    print("  largest other ops (ms per step): " + ", ".join(
        f"{k} {v:.2f}" for k, v in h["top_other_ops_ms_per_step"].items()))
    for row in report.get("bandwidth_1_row", []):
        print(f"  {row['dtype']:>8} {row['module']:<24} {row['step_ms']:6.1f} ms  "
              f"{(row['weight_bytes'] + row['kv_bytes']) / 1e6:6.1f} MB read  {row['gb_per_s']:5.1f} GB/s = "
              f"{row['fraction_of_bandwidth']:.0%} of the copy bandwidth ({row['bandwidth_gb_per_s']:.1f} GB/s)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_profile.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
