"""``rollout.name=efficient`` resolves in verl's two registries, in fresh processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

LOOKUP = """
import verl
from verl.workers.rollout.base import get_rollout_class
from verl.workers.rollout.replica import RolloutReplicaRegistry
print(get_rollout_class("efficient", "async").__name__, RolloutReplicaRegistry.get("efficient").__name__)
"""


def _lookup(**env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOOKUP], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_plain_import_of_verl_registers_efficient_through_the_entry_point():
    done = _lookup()
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["EfficientServerAdapter", "EfficientReplica"]


def test_external_modules_variable_registers_when_plugins_are_off():
    assert _lookup(VERL_USE_EXTERNAL_PLUGINS="none").returncode != 0  # the name is unknown without us
    done = _lookup(VERL_USE_EXTERNAL_PLUGINS="none",
                   VERL_USE_EXTERNAL_MODULES="verl_efficientrollout.verl_adapter.plugin")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["EfficientServerAdapter", "EfficientReplica"]


def test_register_is_idempotent_and_refuses_a_foreign_efficient():
    from verl.workers.rollout import base

    from verl_efficientrollout.verl_adapter.registry import ADAPTER_CLASS, is_registered, register

    register()
    register()
    assert is_registered() and base._ROLLOUT_REGISTRY[("efficient", "async")] == ADAPTER_CLASS
    base._ROLLOUT_REGISTRY[("efficient", "async")] = "somebody.else.Rollout"
    try:
        with pytest.raises(RuntimeError, match="already registered"):
            register()
    finally:
        base._ROLLOUT_REGISTRY[("efficient", "async")] = ADAPTER_CLASS


def test_unsupported_verl_version_fails_with_the_supported_range(monkeypatch):
    import importlib.metadata

    from verl_efficientrollout.verl_adapter import registry

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.11.0")
    with pytest.raises(RuntimeError, match=r"verl 0.11.0 is not supported.*>=0.9,<0.10"):
        registry.register()
