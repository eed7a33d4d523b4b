"""The GRPO example scripts against verl's real hydra config, without a GPU (their DRY_RUN mode),
and the dry run's own errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "examples" / "grpo").glob("[!_]*.sh"))
# What may differ between a script's efficient run and its AR twin (values derived from the
# experiment name or the rollout name by verl's interpolations are compared with the mode masked).
ROLLOUT_KEYS = {"actor_rollout_ref.rollout.name", "actor_rollout_ref.rollout.custom"}


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict[tuple[str, str], tuple[str, Path]]:
    """Every script in both modes with DRY_RUN=1, side by side (each is mostly verl's import time):
    (script stem, mode) -> (stdout, composed config YAML)."""
    folder = tmp_path_factory.mktemp("dry_runs")
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "DATA": "/nonexistent/data",
           "PROFILE": "cpu-smollm2-135m"}
    running = {}
    for script in SCRIPTS:
        for mode in ("efficient", "ar"):
            save = folder / f"{script.stem}-{mode}.yaml"
            running[script.stem, mode] = (save, subprocess.Popen(
                ["bash", str(script), mode], env={**env, "DRY_RUN_SAVE": str(save)},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for engine in ("vllm", "sglang"):
        save = folder / f"gsm8k-efficient-{engine}.yaml"
        running[SCRIPTS[0].stem, f"efficient, engine {engine}"] = (save, subprocess.Popen(
            ["bash", str(SCRIPTS[0]), "efficient"], env={**env, "DRY_RUN_SAVE": str(save), "ENGINE": engine},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    for key, (save, process) in running.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, (key, out, err)
        results[key] = (out, save)
    return results


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def _mask_mode(value):
    if not isinstance(value, str):
        return value
    if value in ("efficient", "vllm"):
        return "<rollout>"
    return value.replace("_efficient", "_<mode>").replace("_ar", "_<mode>")


def test_grpo_scripts_exist_for_one_gpu_gsm8k_and_the_paper_setting():
    assert [s.name for s in SCRIPTS] == ["gsm8k_qwen2.5-0.5b.sh", "math_qwen2.5-7b_paper.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.stem)
def test_grpo_script_and_its_ar_twin_compose_and_differ_only_in_the_rollout(script, dry_runs):
    from omegaconf import OmegaConf

    (efficient, efficient_yaml), (ar, ar_yaml) = dry_runs[script.stem, "efficient"], dry_runs[script.stem, "ar"]
    assert "verl config composed and validated: rollout.name=efficient" in efficient
    assert "custom.efficient (validated):" in efficient and "drafter: int4-asym-g128" in efficient
    assert "verl config composed and validated: rollout.name=vllm" in ar
    assert "data.train_files: /nonexistent/data" in efficient  # absent inputs warn, not fail
    configs = [_flatten(OmegaConf.to_container(OmegaConf.load(path))) for path in (efficient_yaml, ar_yaml)]
    differ = {k for k in configs[0].keys() | configs[1].keys()
              if _mask_mode(configs[0].get(k)) != _mask_mode(configs[1].get(k))}
    assert differ and {k.split(".efficient")[0] for k in differ} <= ROLLOUT_KEYS, differ
    assert configs[0]["actor_rollout_ref.rollout.temperature"] == 1.0


def test_engine_vllm_composes_with_verls_rollout_settings_for_the_vllm_backend(dry_runs):
    out, _ = dry_runs[SCRIPTS[0].stem, "efficient, engine vllm"]
    assert "engine: vllm" in out and "gpu_memory_utilization=0.5" in out and "max_num_seqs=" in out


def test_engine_sglang_composes_with_verls_rollout_settings_and_a_fixed_draft_length(dry_runs):
    out, _ = dry_runs[SCRIPTS[0].stem, "efficient, engine sglang"]
    assert "engine: sglang" in out and "mem_fraction_static=0.5" in out and "toggle=always" in out, out


def test_grpo_script_without_a_mode_prints_its_usage():
    done = subprocess.run(["bash", str(SCRIPTS[0])], env={**os.environ, "DRY_RUN": "1"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "efficient|ar" in done.stderr


BASE = ["algorithm.adv_estimator=grpo", "actor_rollout_ref.model.path=Qwen/Qwen2.5-0.5B-Instruct",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4", "trainer.n_gpus_per_node=1"]


@pytest.mark.parametrize("overrides, message", [
    (["actor_rollout_ref.rollout.name=efficient", "+actor_rollout_ref.rollout.custom={efficient: {controller: {gamma: 0}}}"],
     "gamma must be an integer in [1, 8], got 0"),
    (["actor_rollout_ref.rollout.name=efficient", "+actor_rollout_ref.rollout.custom={efficient: {drafter: int3}}"],
     "drafter"),
    (["actor_rollout_ref.rollout.name=efficient", "actor_rollout_ref.rollout.tempreature=1.0"], "hydra rejected"),
    (["actor_rollout_ref.rollout.name=effcient"], "registered: "),
    (["actor_rollout_ref.rollout.name=efficient", "data.train_batch_size=3", "actor_rollout_ref.rollout.n=1",
      "trainer.n_gpus_per_node=2"], "verl rejected the config"),
], ids=["our-field", "drafter-recipe", "verl-key-typo", "rollout-name-typo", "verl-batch-arithmetic"])
def test_dry_run_names_what_is_wrong(overrides, message):
    from verl_efficientrollout.verl_adapter.dry_run import dry_run

    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        dry_run(BASE + overrides)


def test_prepared_rows_score_with_verls_own_reward_function(load_example):
    from verl.utils.reward_score import default_compute_score

    prep = load_example("grpo/prepare_data.py")
    gsm8k = prep.gsm8k_row({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 1,005"}, "train", 0)
    assert gsm8k["reward_model"]["ground_truth"] == "1005"
    assert default_compute_score(gsm8k["data_source"], "so #### 1005", "1005") == 1.0
    assert default_compute_score(gsm8k["data_source"], "so #### 1006", "1005") == 0.0
    math = prep.math_row({"problem": "Simplify.", "solution": "Thus $\\boxed{\\frac{1}{2}}$.", "level": "Level 4"},
                         "train", 3)
    assert math["reward_model"]["ground_truth"] == "\\frac{1}{2}"
    assert default_compute_score(math["data_source"], "so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}") == 1.0
    with pytest.raises(ValueError, match="#### N"):
        prep.gsm8k_row({"question": "q", "answer": "no marker"}, "test", 7)
