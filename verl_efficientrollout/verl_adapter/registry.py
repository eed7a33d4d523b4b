"""The one place that touches veRL's rollout registries (one of them private)."""

from __future__ import annotations

import importlib.metadata

ROLLOUT_NAME = "efficient"
SUPPORTED_VERL = ((0, 9), (0, 10))  # >= 0.9, < 0.10
ADAPTER_CLASS = "verl_efficientrollout.verl_adapter.rollout.EfficientServerAdapter"


def check_verl_version() -> str:
    """The installed verl version, or an actionable error if it is missing or unsupported."""
    try:
        version = importlib.metadata.version("verl")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError("verl is not installed: pip install 'verl-efficientrollout[verl]' (verl==0.9.1)") from None
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    low, high = SUPPORTED_VERL
    if not low <= parts < high:
        raise RuntimeError(
            f"verl {version} is not supported: verl-efficientrollout registers into verl's rollout registries "
            f"as they are in verl >={'.'.join(map(str, low))},<{'.'.join(map(str, high))}; "
            f"install verl==0.9.1 or a verl-efficientrollout release for verl {version}"
        )
    return version


def register() -> None:
    """Make ``rollout.name=efficient`` resolve in this process: the worker-side rollout class
    (mode ``async``) and the driver-side replica. Idempotent."""
    check_verl_version()
    from verl.workers.rollout import base, replica

    registry = getattr(base, "_ROLLOUT_REGISTRY", None)
    if not isinstance(registry, dict):
        raise RuntimeError(
            "verl.workers.rollout.base._ROLLOUT_REGISTRY is gone from this verl: the worker-side rollout "
            "registry changed; update verl_efficientrollout.verl_adapter.registry for it"
        )
    existing = registry.get((ROLLOUT_NAME, "async"))
    if existing not in (None, ADAPTER_CLASS):
        raise RuntimeError(f"rollout name {ROLLOUT_NAME!r} is already registered to {existing}; not overriding it")
    registry[(ROLLOUT_NAME, "async")] = ADAPTER_CLASS
    replica.RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica)


def known_rollouts(mode: str = "async") -> tuple[str, ...]:
    """Rollout names verl resolves for ``mode`` on both sides (worker class and replica), without
    importing any backend (that would import vLLM or SGLang)."""
    from verl.workers.rollout import base, replica

    return tuple(sorted(name for name, m in base._ROLLOUT_REGISTRY if m == mode
                        and name in replica.RolloutReplicaRegistry._registry))


def is_registered() -> bool:
    from verl.workers.rollout import base, replica

    return (ROLLOUT_NAME, "async") in base._ROLLOUT_REGISTRY and ROLLOUT_NAME in replica.RolloutReplicaRegistry._registry


def _load_replica():
    from verl_efficientrollout.verl_adapter.rollout import EfficientReplica

    return EfficientReplica
