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


def test_processes_starting_at_once_convert_a_bundled_model_once(tmp_path, monkeypatch):
    """While one process converts (it holds the lock beside the folder), another waits for it, then finds the folder
    made and converts nothing. The conversion itself is replaced by a recorder: the test is about who converts."""
    import threading

    from filelock import FileLock

    from pipeline import models

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path))
    converted = []

    def convert(alias, target):
        converted.append(alias)
        target.mkdir(parents=True)
        (target / "model.safetensors").write_text("converted")

    monkeypatch.setattr(models, "_convert_bundled", convert)
    alias = "bundled:smollm2-135m-instruct"
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    folder.parent.mkdir(parents=True)
    found = []
    with FileLock(folder.with_name(folder.name + ".lock")):  # another process is converting
        waiter = threading.Thread(target=lambda: found.append(materialize_bundled(alias)))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not converted  # it waits for the lock instead of converting beside it
        folder.mkdir()
        (folder / "model.safetensors").write_text("made by the other process")
    waiter.join(10)
    assert found == [folder] and not converted
    assert (folder / "model.safetensors").read_text() == "made by the other process"

    other = materialize_bundled("bundled:gemma3-270m")  # nobody holds its lock: converted here, once
    assert converted == ["bundled:gemma3-270m"] and materialize_bundled("bundled:gemma3-270m") == other


@pytest.mark.integration
def test_the_bundled_base_model_materialises_with_the_bos_it_was_trained_behind(tmp_path, monkeypatch):
    """Gemma 3 270M, a base model shipped as GGUF parts: assembled, converted, and its tokenizer adds BOS as the
    GGUF says (transformers' GGUF tokenizer never does). Its real weights need it: with BOS they complete "Paris is
    the capital of" with France, without it with "the capital of the capital...". No chat template, so the plain
    one the pipeline gives it leads with the BOS too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.chat_templates import chat_template_for

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path))
    path = resolve_model("bundled:gemma3-270m")
    folder = tmp_path / "models" / "gemma3-270m"
    assert path == str(folder) and sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    assert not (folder / "gguf").exists()  # the assembled GGUF file is not kept beside its weights
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)

    def complete(text: str, bos: bool) -> str:
        prompt = tokenizer(text, return_tensors="pt", add_special_tokens=bos)
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
        return tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])

    assert complete("Paris is the capital of", bos=True).split()[0] == "France"
    assert "France" not in complete("Paris is the capital of", bos=False)
    assert tokenizer.chat_template is None
    template = chat_template_for(tokenizer, None, path)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], chat_template=template, tokenize=False)
    assert chat.startswith("<bos>User:\nHi") and chat.count("<bos>") == 1, chat


def test_local_folder_resolves_to_its_absolute_path(tiny_model):
    assert resolve_model(str(tiny_model)) == str(tiny_model.resolve())
