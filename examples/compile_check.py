"""Does torch.compile pay for the lean engine's steps on this machine?

    python examples/compile_check.py

Times a target step (1 and 5 tokens per row) eager, then with each decoder block compiled by
inductor (dynamic shapes: the active batch and context change every step), and prints the
warm-up time and compiled / eager per shape.
"""

import statistics
import time

import torch

from verl_efficientrollout.engine.model import KVCache
from verl_efficientrollout.engine.native import NativeEngine, NativeEngineConfig

SHAPES = [(batch, tokens) for batch in (1, 4, 16) for tokens in (1, 5)]


def main() -> None:
    model = NativeEngine.load("default", engine_config=NativeEngineConfig(dtype="float32")).target
    cache = KVCache(model.args, 16, 400, model.dtype)

    def step(batch: int, tokens: int, context: int) -> None:
        ids = torch.zeros(batch, tokens, dtype=torch.long)
        model(ids, context + torch.arange(tokens).expand(batch, -1), cache, torch.arange(batch))

    def median_ms(batch: int, tokens: int, n: int = 15) -> float:
        times = []
        for i in range(n + 2):
            start = time.perf_counter()
            step(batch, tokens, 300 + i)
            if i >= 2:
                times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    with torch.inference_mode():
        eager = {shape: median_ms(*shape) for shape in SHAPES}
        for block in model.layers:
            block.compile(dynamic=True)
        start = time.perf_counter()
        for shape in SHAPES:
            step(*shape, 300)
        print(f"compile warm-up {time.perf_counter() - start:.1f} s")
        for shape in SHAPES:
            compiled = median_ms(*shape)
            print(f"batch {shape[0]:2d} x {shape[1]} tokens: eager {eager[shape]:.0f} ms, "
                  f"compiled {compiled:.0f} ms, ratio {compiled / eager[shape]:.2f}")


if __name__ == "__main__":
    main()
