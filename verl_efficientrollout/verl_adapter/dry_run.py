"""Check a veRL training command's overrides without a GPU: ``efficient-rollout verl-dry-run``.

The GRPO scripts in ``examples/grpo/`` pass their override list here when run with
``DRY_RUN=1``. What is checked is what ``python -m verl.trainer.main_ppo`` would do before it
needs a GPU, with verl's own code: hydra composes verl's ``ppo_trainer`` config with the
overrides (unknown keys, bad syntax), verl's ``validate_config`` checks the batch arithmetic,
the rollout node becomes verl's ``RolloutConfig`` dataclass, the rollout name resolves in
verl's registries, and for ``rollout.name=efficient`` our ``custom.efficient`` section is
parsed into validated settings. Data files, the model and the cost profile are looked up too,
but their absence only warns (a CI machine has none of them).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


@dataclass(frozen=True)
class DryRunReport:
    """What a dry run found: the composed config's key facts and the warnings."""

    rollout_name: str
    summary: dict[str, Any]
    efficient: dict[str, Any] | None  # our validated settings (rollout.name=efficient), else None
    warnings: tuple[str, ...] = field(default_factory=tuple)
    config: Any = None  # the composed, resolved DictConfig (for tests and callers)

    def format(self) -> str:
        lines = [f"verl config composed and validated: rollout.name={self.rollout_name}"]
        lines += [f"  {key}: {value}" for key, value in self.summary.items()]
        if self.efficient is not None:
            lines.append("  custom.efficient (validated):")
            lines += [f"    {key}: {value}" for key, value in self.efficient.items()]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def verl_config_dir() -> Path:
    """verl's own hydra config folder (``verl/trainer/config``)."""
    from verl_efficientrollout.verl_adapter.registry import check_verl_version

    check_verl_version()
    import verl

    folder = Path(verl.__file__).parent / "trainer" / "config"
    if not (folder / "ppo_trainer.yaml").exists():
        raise RuntimeError(f"verl's ppo_trainer.yaml is not in {folder}: this verl lays out its config differently")
    return folder


def compose_trainer_config(overrides: Sequence[str], config_name: str = "ppo_trainer"):
    """verl's trainer config with ``overrides`` applied, as ``main_ppo``'s ``@hydra.main`` builds it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(verl_config_dir()), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides))


def dry_run(overrides: Sequence[str]) -> DryRunReport:
    """Compose and validate; raises ``ValueError`` naming what is wrong."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        config = compose_trainer_config(overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ValueError(f"hydra rejected the overrides: {exc}") from exc

    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    try:
        validate_config(config=config, use_reference_policy=need_reference_policy(config),
                        use_critic=need_critic(config))
        OmegaConf.resolve(config)
        rollout = omega_conf_to_dataclass(config.actor_rollout_ref.rollout)
    except (AssertionError, HydraException, OmegaConfBaseException, TypeError) as exc:
        raise ValueError(f"verl rejected the config: {exc}") from exc

    from verl_efficientrollout.verl_adapter.registry import known_rollouts, register

    register()  # what verl's plugin loading does in every process
    if rollout.name not in known_rollouts(rollout.mode):
        raise ValueError(f"actor_rollout_ref.rollout.name={rollout.name!r} (mode {rollout.mode!r}) is not a rollout "
                         f"verl knows here; registered: {', '.join(known_rollouts(rollout.mode))}")

    warnings: list[str] = []
    efficient = None
    if rollout.name == "efficient":
        from verl.workers.rollout.base import get_rollout_class
        from verl.workers.rollout.replica import RolloutReplicaRegistry

        from verl_efficientrollout.controller.cost_model import load_profile
        from verl_efficientrollout.verl_adapter.config import efficient_config

        get_rollout_class(rollout.name, rollout.mode)  # our classes import without a GPU: load them as
        RolloutReplicaRegistry.get(rollout.name)  # verl's workers and driver will
        settings = efficient_config(rollout)  # ValueError naming the field
        efficient = {"engine": settings.engine, "drafter": settings.drafter.name,
                     "controller": _controller_summary(settings.controller)}
        if settings.engine == "vllm":
            v = settings.vllm
            efficient["vllm"] = (f"dtype={v.dtype} max_model_len={v.max_model_len} max_num_seqs={v.max_num_seqs} "
                                 f"gpu_memory_utilization={v.gpu_memory_utilization} enforce_eager={v.enforce_eager}")
            if importlib.util.find_spec("vllm") is None:
                warnings.append("engine vllm: vLLM is not installed here (the rollout servers need it)")
        elif settings.engine == "sglang":
            from verl_efficientrollout.sglang_backend.engine import server_args

            s = settings.sglang
            server_args("<model>", settings)  # refuses a controller SGLang cannot honour, naming why
            efficient["sglang"] = (f"dtype={s.dtype} max_model_len={s.max_model_len} max_num_seqs={s.max_num_seqs} "
                                   f"mem_fraction_static={s.mem_fraction_static} disable_cuda_graph={s.disable_cuda_graph}")
            if importlib.util.find_spec("sglang") is None:
                warnings.append("engine sglang: SGLang is not installed here (the rollout servers need it)")
        else:
            efficient["native"] = (f"dtype={settings.native.dtype} device={settings.native.device} "
                                   f"max_model_len={settings.native.max_model_len}")
        try:
            load_profile(settings.controller.profile, settings.engine)
        except (OSError, ValueError) as exc:
            warnings.append(f"cost profile {settings.controller.profile!r} does not load here: {exc}")
    warnings += _missing_inputs(config)
    trainer = config.trainer
    summary = {
        "algorithm.adv_estimator": config.algorithm.adv_estimator,
        "model": config.actor_rollout_ref.model.path,
        "prompts per step x samples": f"{config.data.train_batch_size} x {rollout.n}",
        "prompt / response length": f"{rollout.prompt_length} / {rollout.response_length}",
        "temperature": rollout.temperature,
        "rollout tensor parallel": rollout.tensor_model_parallel_size,
        "GPUs": f"{trainer.nnodes} node(s) x {trainer.n_gpus_per_node}",
    }
    return DryRunReport(rollout.name, summary, efficient, tuple(warnings), config)


def _controller_summary(controller) -> str:
    keys = ("toggle", "draft_length", "gamma", "gamma_min", "gamma_max", "margin", "off_margin", "profile")
    values = dataclasses.asdict(controller)
    return " ".join(f"{k}={values[k]}" for k in keys if k in values)


def _missing_inputs(config) -> list[str]:
    """Data files and a local model directory that are not on this machine."""
    found = []
    for key in ("train_files", "val_files"):
        files = config.data.get(key)
        files = [files] if isinstance(files, str) else list(files or [])
        found += [f"data.{key}: {f} does not exist here" for f in files if not os.path.exists(f)]
    path = str(config.actor_rollout_ref.model.path)
    if path.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(path)):
        found.append(f"actor_rollout_ref.model.path: {path} is not a directory here")
    return found
