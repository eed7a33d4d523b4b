"""The ``sglang.srt.plugins`` entry point: what SGLang loads in each of its processes."""

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
