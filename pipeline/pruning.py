"""A student derived from its teacher by depth pruning (`student.prune`): the teacher's model with the decoder
layers dropped whose output least changes their input on the task's own prompts.

    path = student_model(config)   # the untuned student every stage loads: student.model, or the pruned teacher

Each layer's importance is its block influence (ShortGPT): 1 - the cosine of its input and output hidden states,
averaged over the tokens of `calibration_examples` train prompts in the student's prompt style. A layer that
passes its input through unchanged scores 0 and goes first. The pruned model is made once per run, in
`<run>/student/model/` (safetensors, the teacher's tokenizer), with a manifest holding each layer's importance and
the layers dropped; the stages that load the student (filter's replay, train, benchmark) all take it from there.
It shares the teacher's tokenizer, so logit KD from the teacher applies to its recovery.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline.chat_templates import chat_template_for
from pipeline.config import ExperimentConfig, PruneConfig
from pipeline.console import PipelineError, log
from pipeline.layout import read_manifest
from pipeline.models import resolve_model
from pipeline.runs import Stage
from pipeline.tasks import task_for

STAGE = "student"  # its folder under the run directory, beside the stages'


def student_model(config: ExperimentConfig) -> str:
    """The untuned student: `student.model` resolved, or with `student.prune` the teacher's model pruned, made
    here the first time a stage asks for it in this run (and again when the teacher, the settings or the task's
    data change)."""
    if config.student.prune is None:
        return resolve_model(config.student.model)
    folder = config.layout.pruned_student
    stage = _stage(config)
    if stage.is_fresh():
        return str(folder)
    with stage:
        if stage.is_fresh():  # made while this process waited for the lock
            return str(folder)
        scores = _prune(config, config.student.prune, folder)
        stage.finish([folder], scores, summary={"layers_kept": scores["layers_kept"]})
    return str(folder)


def student_model_name(config: ExperimentConfig) -> str:
    """The untuned student's model as the stages name it, without making it: `student.model`, or the pruned
    student's folder (made by `student_model`, which each stage that loads the student calls first)."""
    return str(config.layout.pruned_student) if config.student.prune else str(config.student.model)


def student_identity(config: ExperimentConfig) -> str:
    """What the student is, the same in every run that makes it alike: its model, or its source and pruning."""
    prune = config.student.prune
    if prune is None:
        return str(config.student.model)
    return f"{config.teacher.model} pruned to keep_layers={prune.keep_layers:g}"


def pruning_manifest(config: ExperimentConfig) -> dict[str, Any] | None:
    """The figures of a pruned student (layer counts, each layer's importance, the layers dropped), from its
    manifest; None for a student that was not pruned here."""
    manifest = read_manifest(config.layout.stage_dir(STAGE)) if config.student.prune else None
    return manifest["metrics"] if manifest else None


def _stage(config: ExperimentConfig) -> Stage:
    sections = {
        "seed": config.seed,
        "teacher_model": config.teacher.model,
        "prune": config.student.prune.model_dump() if config.student.prune else None,
        "prompt_style": config.student.prompt_style,
        "chat_template": config.benchmark.engine.chat_template,
        "task": config.task.model_dump(),
    }
    return Stage(config, STAGE, sections, inputs=task_for(config).data_files(), artifact=False)


def layers_to_keep(prune: PruneConfig, total: int) -> int:
    """How many of `total` layers `keep_layers` keeps (a fraction, or a count); one line naming the key when it
    would keep none or all of them."""
    keep = round(prune.keep_layers * total) if prune.keep_layers < 1 else int(prune.keep_layers)
    if not 1 <= keep < total:
        raise PipelineError(
            f"student.prune.keep_layers: {prune.keep_layers:g} keeps {keep} of the teacher's {total} layers; keep at "
            f"least 1 and fewer than {total}"
        )
    return keep


def decoder_layers(model: Any) -> Any:
    """The model's stack of decoder layers (`model.layers` of a causal LM: Llama, Qwen2, Mistral, Gemma 3, ...);
    one line when it has none."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not len(layers):
        raise PipelineError(
            f"student.prune: the pruner drops layers of a decoder stack at model.layers (Llama, Qwen2, Mistral, "
            f"Gemma 3 and the like); {type(model).__name__} has none"
        )
    return layers


def block_influence(model: Any, batches: list[Any]) -> list[float]:
    """Each decoder layer's block influence over `batches` (token id tensors of one prompt each): 1 - the cosine
    of its input and output hidden states, averaged over every token. Read with hooks on the layers themselves,
    since the model's own hidden_states put the final norm on the last one."""
    import torch

    layers = decoder_layers(model)
    captured: dict[int, tuple[Any, Any]] = {}

    def keep(index: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            hidden_in = args[0] if args else kwargs["hidden_states"]
            captured[index] = (hidden_in, output[0] if isinstance(output, tuple) else output)

        return hook

    handles = [layer.register_forward_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
    totals, tokens = torch.zeros(len(layers), dtype=torch.float64), 0
    try:
        with torch.no_grad():
            for input_ids in batches:
                model(input_ids=input_ids)
                for index, (hidden_in, hidden_out) in captured.items():
                    cosine = torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
                    totals[index] += (1 - cosine).sum().double()
                tokens += input_ids.numel()
    finally:
        for handle in handles:
            handle.remove()
    return (totals / max(tokens, 1)).tolist()


def drop_layers(model: Any, dropped: set[int]) -> None:
    """Remove the `dropped` decoder layers in place, renumbering the rest so that the KV cache and per-layer
    settings (Gemma 3's sliding and full attention, `layer_types`) follow the layers kept."""
    import torch

    layers = decoder_layers(model)
    kept = [layer for index, layer in enumerate(layers) if index not in dropped]
    model.model.layers = torch.nn.ModuleList(kept)
    for index, layer in enumerate(kept):
        for part in (layer, getattr(layer, "self_attn", None)):
            if part is not None and hasattr(part, "layer_idx"):
                part.layer_idx = index
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [kind for index, kind in enumerate(config.layer_types) if index not in dropped]
    config.num_hidden_layers = len(kept)


def _prune(config: ExperimentConfig, prune: PruneConfig, folder: Path) -> dict[str, Any]:
    """Load the teacher's model, measure each layer's importance, drop the least important and save the rest;
    returns the figures for the manifest."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(config.teacher.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    saved_dtype = AutoConfig.from_pretrained(source).torch_dtype  # measured in fp32, saved as the teacher is
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.eval()
    total = len(decoder_layers(model))
    keep = layers_to_keep(prune, total)
    template = chat_template_for(tokenizer, config.benchmark.engine.chat_template, source) or tokenizer.chat_template
    task = task_for(config)
    batches = []
    for example in task.split("train")[: prune.calibration_examples]:
        text = tokenizer.apply_chat_template(
            task.messages(example, config.student.prompt_style),
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        batches.append(ids[:, : prune.calibration_max_length])
    importance = block_influence(model, batches)
    dropped = sorted(sorted(range(total), key=lambda index: importance[index])[: total - keep])
    drop_layers(model, set(dropped))
    log(
        f"student: pruned {config.teacher.model} from {total} to {keep} layers by block influence on "
        f"{len(batches)} train prompts; dropped {dropped}"
    )
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(saved_dtype if isinstance(saved_dtype, torch.dtype) else torch.float32)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return {
        "source": config.teacher.model,
        "layers_total": total,
        "layers_kept": keep,
        "layers_dropped": dropped,
        "importance": [round(value, 6) for value in importance],
        "calibration_examples": len(batches),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
