"""Model resolution, including the bundled SmolLM2 GGUF materialised into a plain safetensors folder."""

from __future__ import annotations

import json

import pytest

from pipeline.models import materialize_bundled, resolve_model


@pytest.mark.integration
def test_bundled_model_materialises_once_and_loads_like_any_hf_model(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path))
    path = resolve_model("bundled:smollm2-135m-instruct")
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    assert path == str(folder)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # vLLM would otherwise try to load GGUF quantisation
    assert (folder / "model.safetensors").stat().st_size > 100e6
    stamp = (folder / "model.safetensors").stat().st_mtime
    assert materialize_bundled("bundled:smollm2-135m-instruct") == folder  # cached: not converted again
    assert (folder / "model.safetensors").stat().st_mtime == stamp

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer  # real weights, not random ones


def test_local_folder_resolves_to_its_absolute_path(tiny_model):
    assert resolve_model(str(tiny_model)) == str(tiny_model.resolve())
