import json

import pytest

from verl_efficientrollout.models import default_model_dir, resolve_model, torch_dtype


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="local Hugging Face model directory containing config.json"):
        resolve_model(tmp_path / "nowhere")


def test_local_directory_resolves_to_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path


def test_unknown_dtype_names_the_allowed_ones():
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        torch_dtype("int4")


@pytest.mark.model
def test_default_model_is_a_plain_hf_directory_that_stops_at_im_end(default_model):
    model, tokenizer = default_model
    config = json.loads((default_model_dir() / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == model.generation_config.eos_token_id == 2
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
