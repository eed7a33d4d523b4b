"""The ``sglang.srt.plugins`` entry point (what SGLang loads in each of its processes) and the
SGLang version check."""

from __future__ import annotations

import pytest


def test_the_sglang_plugin_never_raises_into_sglang(monkeypatch, caplog):
    """SGLang calls general plugins for every user: a failure must leave SGLang working."""
    from verl_efficientrollout.sglang_backend import compat, plugin

    def unsupported():
        raise RuntimeError("SGLang 0.9.0 is not supported")

    monkeypatch.setattr(compat, "quantization_api", unsupported)
    monkeypatch.setattr(plugin, "_registered", False)
    plugin.register()
    assert "inactive" in caplog.text and "0.9.0" in caplog.text


def test_sglang_loads_our_plugin_and_offers_every_drafter_recipe_as_a_quantization_method():
    pytest.importorskip("sglang", reason="needs SGLang (the sglang tier, .venv-sglang)")
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import QUANTIZATION_CHOICES

    load_plugins()  # what sglang.Engine and each scheduler process call: our entry point is installed
    names = ["efficient_int4_g32", "efficient_int4_g64", "efficient_int4_g128", "efficient_int4_g256",
             "efficient_int8"]
    assert all(name in QUANTIZATION_METHODS and name in QUANTIZATION_CHOICES for name in names)
    method = QUANTIZATION_METHODS["efficient_int4_g32"]()  # online: built without a config file
    assert method.get_name() == "efficient_int4_g32" and method.get_config_filenames() == []


def test_a_missing_or_unsupported_sglang_fails_with_what_to_install(monkeypatch):
    import importlib.metadata

    from verl_efficientrollout.sglang_backend import compat

    def version_of(installed):
        def version(name):
            if name != "sglang" or installed is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return installed
        return version

    monkeypatch.setattr(importlib.metadata, "version", version_of(None))
    with pytest.raises(ImportError, match=r"SGLang is not installed: pip install 'verl-efficientrollout\[sglang\]'"):
        compat.sglang_version()
    monkeypatch.setattr(importlib.metadata, "version", version_of("0.4.9"))
    with pytest.raises(RuntimeError, match=r"SGLang 0.4.9 is not supported .* sglang>=0.5.12,<0.6.0"):
        compat.sglang_version()
    monkeypatch.setattr(importlib.metadata, "version", version_of("0.5.12"))
    assert compat.sglang_version() == ("0.5.12", (0, 5, 12))
