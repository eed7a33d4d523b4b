"""Where a native decode step's time goes, and how close its steps come to the memory bandwidth.

    .venv/bin/python examples/step_profile.py [--dtype float32] [--tokens 64] [--no-decode-ops]
        [--decode-ops-rows 1,4,16,64] [--out results/step_profile]

1. Host overhead: one row decodes ``--tokens`` tokens (plain decoding) under the PyTorch profiler.
   "Model kernels" are the GEMMs (dense and int4) and the attention kernel (PyTorch's, or the compiled
   CPU op that also does RoPE and the KV write); everything else (Python,
   the dispatcher, gathers and copies, elementwise ops, sampling) is the share outside them.
2. Bandwidth: a target step in float32 and in bfloat16 and a drafter step at 1 row (256 positions of
   KV), each as bytes of weights and KV read per step / step time, against this machine's measured
   copy bandwidth (read + write of a 512 MiB tensor).
3. Decode ops (``--decode-ops-rows 1,4,16,64``): float32 target and drafter steps with the compiled
   CPU ops off and on, two engines in this process, interleaved, at each row count.

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
           "aten::_scaled_dot_product_attention_math", "aten::_scaled_dot_product_efficient_attention",
           "verl_efficientrollout::decode_attention")  # the compiled CPU op: RoPE, KV write and attention


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


def bandwidth_fraction(model: str, context: int = 256, repeats: int = 9, decode_ops: bool = True) -> list[dict]:
    bandwidth = copy_bandwidth()
    rows = []
    for dtype in ("float32", "bfloat16"):
        engine = NativeEngine.load(model, EfficientRolloutConfig(),
                                   NativeEngineConfig(dtype=dtype, cpu_decode_ops=decode_ops))
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
                    module(tokens, positions, cache, slice(0, 1))  # the engine's decode: contiguous slots
                    seconds.append(time.perf_counter() - start)
                step = statistics.median(seconds[2:])
                rows.append({"dtype": dtype, "module": name, "step_ms": 1e3 * step, "weight_bytes": weight_bytes,
                             "kv_bytes": kv_bytes, "gb_per_s": (weight_bytes + kv_bytes) / step / 1e9,
                             "bandwidth_gb_per_s": bandwidth / 1e9,
                             "fraction_of_bandwidth": (weight_bytes + kv_bytes) / step / bandwidth})
    return rows


def decode_ops_speed(model: str, rows: list[int], context: int = 256, repeats: int = 7) -> list[dict]:
    """Median float32 step times with ``native.cpu_decode_ops`` off and on (same process, interleaved)."""
    engines = {on: NativeEngine.load(model, EfficientRolloutConfig(), NativeEngineConfig(dtype="float32", cpu_decode_ops=on))
               for on in (False, True)}
    records = []
    with torch.inference_mode():
        for batch in rows:
            tokens = torch.zeros(batch, 1, dtype=torch.long)
            positions = context - torch.arange(batch)[:, None] % 50  # rows at different lengths
            seconds: dict[tuple[bool, str], list[float]] = {}
            caches = {on: KVCache(e.target.args, batch, context + 1, torch.float32) for on, e in engines.items()}
            for i in range(repeats + 2):  # two warm-ups
                for on, engine in engines.items():
                    for kind, module in (("target", engine.target), ("draft", engine.drafter.module)):
                        start = time.perf_counter()
                        module(tokens, positions, caches[on], slice(0, batch), keys=context + 1)
                        if i >= 2:
                            seconds.setdefault((on, kind), []).append(time.perf_counter() - start)
            for kind in ("target", "draft"):
                off, on = (statistics.median(seconds[flag, kind]) for flag in (False, True))
                records.append({"rows": batch, "module": kind, "off_ms": 1e3 * off, "on_ms": 1e3 * on, "speedup": off / on})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--skip-bandwidth", action="store_true")
    parser.add_argument("--no-decode-ops", action="store_true", help="PyTorch's ops instead of the compiled CPU ops")
    parser.add_argument("--decode-ops-rows", default="", help="e.g. 1,4,16,64: section 3 at these row counts")
    parser.add_argument("--out", type=Path, default=Path("results/step_profile"))
    args = parser.parse_args()
    native = NativeEngineConfig(dtype=args.dtype, cpu_decode_ops=not args.no_decode_ops)
    engine = NativeEngine.load(args.model, EfficientRolloutConfig(), native)
    report = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
              "dtype": args.dtype, "cpu_decode_ops": engine.target.decode_ops is not None,
              "host_overhead_1_row": host_overhead(engine, args.tokens)}
    del engine
    if not args.skip_bandwidth:
        report["bandwidth_1_row"] = bandwidth_fraction(args.model, decode_ops=not args.no_decode_ops)
    if args.decode_ops_rows:
        report["decode_ops"] = decode_ops_speed(args.model, [int(r) for r in args.decode_ops_rows.split(",")])
    h = report["host_overhead_1_row"]
    print(f"{report['cpu_capability']}, {report['threads']} threads, {args.dtype}: 1-row step {h['step_ms']:.1f} ms, "
          f"model kernels {h['kernel_ms']:.1f} ms, outside them {h['outside_kernels_share']:.1%}")
    print("  largest other ops (ms per step): " + ", ".join(
        f"{k} {v:.2f}" for k, v in h["top_other_ops_ms_per_step"].items()))
    for row in report.get("bandwidth_1_row", []):
        print(f"  {row['dtype']:>8} {row['module']:<24} {row['step_ms']:6.1f} ms  "
              f"{(row['weight_bytes'] + row['kv_bytes']) / 1e6:6.1f} MB read  {row['gb_per_s']:5.1f} GB/s = "
              f"{row['fraction_of_bandwidth']:.0%} of the copy bandwidth ({row['bandwidth_gb_per_s']:.1f} GB/s)")
    for row in report.get("decode_ops", []):
        print(f"  decode ops, {row['module']:>6} step at {row['rows']:>2} rows: {row['off_ms']:6.1f} ms off -> "
              f"{row['on_ms']:6.1f} ms on ({row['speedup']:.2f}x)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_profile.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
