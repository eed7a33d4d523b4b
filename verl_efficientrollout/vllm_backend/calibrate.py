"""``efficient-rollout calibrate --engine vllm``: vLLM's own step costs, for our scheduler's toggle.

vLLM drafts and verifies inside one engine step, so what is measured is whole decode steps:
one vLLM engine with the int4 self-drafter and our scheduler in calibration mode, which holds K at
0 and at each gamma in turn for ``repeats`` clean decode steps (after one transition step) and
logs each step's time. Each (batch, context) point is one batch of requests of ``context`` random
prompt tokens, decoded greedily without stopping at EOS until every K has been held. K = 0 steps
are the plain step of this engine (with the self-drafter: exactly plain vLLM's step; on the
draft_model route the draft model still runs its catch-up forward there); K > 0 steps are whole
speculative steps (kind ``step``: K drafts and the verify). The profile's structure follows the
route the engine took (``native`` for the self-drafter, ``draft-model`` otherwise).
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from verl_efficientrollout.config import DrafterConfig, EfficientRolloutConfig, VLLMEngineConfig
from verl_efficientrollout.controller import ControllerConfig
from verl_efficientrollout.models import resolve_model


def measure_vllm_step_costs(config, proposer: str = "self") -> tuple[list[dict], str, str]:
    """Median step seconds per (kind, batch, gamma, context) on vLLM for a ``CalibrateConfig``,
    a description of the device, and the cost structure of the drafter route the engine took."""
    import torch
    from vllm import SamplingParams

    from verl_efficientrollout.vllm_backend.compat import run_requests, vllm_version
    from verl_efficientrollout.vllm_backend.engine import VLLMEngine

    model = str(resolve_model(config.model))
    contexts, batches = sorted(set(config.contexts)), sorted(set(config.batches))
    gammas = (0, *sorted(set(config.gammas)))
    hold = config.repeats
    new_tokens = sum((hold + 1) * (g + 1) for g in gammas) + 8  # one full K cycle, whatever is accepted
    engine_config = EfficientRolloutConfig(
        engine="vllm", drafter=DrafterConfig.from_name(config.drafter),
        controller=ControllerConfig.preset("sd-always", gamma=max(gammas)),
        vllm=VLLMEngineConfig(dtype=config.dtype, max_model_len=contexts[-1] + new_tokens + 8,
                              max_num_seqs=max(batches), proposer=proposer))
    with tempfile.TemporaryDirectory(prefix="efficient-calibrate-") as tmp:
        log = Path(tmp) / "steps.jsonl"
        engine = VLLMEngine(model, engine_config, calibration={"gammas": list(gammas), "hold_steps": hold,
                                                               "log": str(log)})
        structure = "native" if engine.proposer == "self" else "draft-model"
        try:
            vocab = engine._vocab_size or 1000
            rng = random.Random(0)
            points = [(c, b) for c in contexts for b in batches]
            run_requests(engine.llm, [{"prompt_token_ids": [rng.randrange(10, vocab - 10) for _ in range(32)]}],
                         [SamplingParams(temperature=0.0, max_tokens=8)])  # warm-up
            measurements = []
            for context, batch in tqdm(points, desc="vLLM calibration points"):
                log.write_text("")
                prompts = [{"prompt_token_ids": [rng.randrange(10, vocab - 10) for _ in range(context)]}
                           for _ in range(batch)]
                params = [SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)] * batch
                run_requests(engine.llm, prompts, params)
                records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
                measurements += _medians(records, context)
        finally:
            engine.close()
    device = (f"{torch.cuda.get_device_name()}" if torch.cuda.is_available()
              else f"{platform.machine()} CPU, {os.cpu_count()} cores")
    return measurements, f"{device}, vLLM {vllm_version()[0]}, {config.dtype}, drafter route {engine.proposer}", \
        structure


def _medians(records: list[dict], context: int) -> list[dict]:
    """One measurement per (kind, batch, gamma) seen at this point: median seconds and context."""
    groups: dict[tuple[str, int, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["kind"], r["batch"], r["gamma"]), []).append(r)
    return [{"kind": kind, "batch": batch, "gamma": gamma, "context": context,
             "total_context": int(statistics.median(r["total_context"] for r in group)),
             "seconds": statistics.median(r["seconds"] for r in group), "steps": len(group)}
            for (kind, batch, gamma), group in sorted(groups.items())]
