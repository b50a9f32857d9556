"""The train stage: assistant-only loss with EOS kept, on real chat templates, and a loss that falls."""

from __future__ import annotations

import pytest

from pipeline.config import validate_config
from pipeline.train.data import to_prompt_completion
from pipeline.train.options import device_defaults
from pipeline.train.trainer import build_trainer
from tests.conftest import (
    QWEN_STYLE_TEMPLATE,
    build_tiny_model,
    kill_midway,
    ping,
    tiny_config,
    train_ping_pong,
    write_filtered,
)

ROWS = [
    {
        "messages": [
            {"role": "system", "content": "You are a customer support agent for Acme Corp."},
            {"role": "user", "content": f"My parcel number {i} never arrived. What now?"},
            {
                "role": "assistant",
                "content": f"Thank you for contacting Acme support. Parcels arrive in {i + 2} days. See [KB-1012].",
            },
        ]
    }
    for i in range(8)
]


def support_trainer(config, model, tmp_path, rows=None, val=()):
    """The stage's trainer on `rows` (prompt-completion; default the support rows above), output under tmp_path."""
    rows = [to_prompt_completion(r) for r in ROWS] if rows is None else rows
    return build_trainer(config, str(model), rows, list(val), tmp_path / "out")


@pytest.fixture(params=["smollm2", "qwen-style"])
def template_model(request, tmp_path, tokenizer):
    """The same tiny weights under two chat templates: SmolLM2's own (pad == EOS) and a Qwen-style one."""
    tok = tokenizer
    if request.param == "qwen-style":
        from copy import deepcopy

        tok = deepcopy(tokenizer)
        tok.chat_template = QWEN_STYLE_TEMPLATE
        tok.pad_token = "<|endoftext|>"
    return build_tiny_model(tmp_path / request.param, tok), tok


def test_labels_mask_everything_but_the_assistant_turn_and_keep_eos(tmp_path, template_model):
    model_path, tok = template_model
    config = validate_config(tiny_config(tmp_path, model_path))
    trainer = support_trainer(config, model_path, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == eos
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        ids, labels = ids[mask.bool()].tolist(), labels[mask.bool()].tolist()
        trained = [i for i, label in zip(ids, labels, strict=True) if label != -100]
        text = tok.decode(trained)
        # Exactly the assistant turn is trained: its text, then the end-of-turn EOS.
        assert text.startswith("Thank you for contacting Acme support."), text
        assert "system" not in text and "parcel number" not in text and "<|im_start|>" not in text
        assert eos in trained, "EOS must stay in the loss, or the student never learns to stop"
        # Everything before the assistant content is masked.
        first_trained = next(k for k, label in enumerate(labels) if label != -100)
        prefix = tok.decode(ids[:first_trained])
        assert prefix.rstrip().endswith("assistant") and "parcel number" in prefix
        assert all(label == -100 for label in labels[:first_trained])


def test_trainer_runs_and_loss_falls(tmp_path, tiny_model):
    """Also on a GPU (scripts/gpu_check.sh), with TRL's fused LM head there (asked for: the size rule leaves it off
    for so small a model), beside Liger's kernels where liger-kernel is installed (asked for: unpacked, they are off
    by default; they used to turn the head off, and the full logits were computed). On the CPU neither key is set:
    the model's own cross-entropy."""
    import torch

    from pipeline.train.options import installed

    cuda = torch.cuda.is_available()
    liger = cuda and installed("liger_kernel")
    raw = tiny_config(tmp_path, tiny_model)
    raw["train"].update({"max_steps": 8, "learning_rate": 1e-2, "per_device_train_batch_size": 8})
    if cuda:
        raw["train"].update({"fused_lm_head": True, "use_liger_kernel": liger})
    config = validate_config(raw)
    trainer = support_trainer(config, tiny_model, tmp_path)
    assert trainer.fused_head == cuda and bool(trainer.args.use_liger_kernel) == liger
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.5, losses  # a clear fall, not noise (random tiny model, LoRA only)


@pytest.mark.parametrize("packing", [False, True])
def test_the_fused_lm_head_loss_is_the_models_cross_entropy(tmp_path, tiny_model, packing):
    """The stage's CUDA default scores the trained tokens through TRL's fused LM head, never materialising the
    logits. No GPU here: the same head is put on the CPU model (TRL scores every position there, in tiles) and its
    loss must equal the model's own cross-entropy on the same batch, padded or packed, normalised the same way."""
    import itertools

    import torch
    from transformers import Trainer
    from trl.trainer.utils import add_fused_lm_head

    overrides = {"train.packing": packing, "train.device": "cpu"}  # on a GPU machine too: the CPU's default path
    config = validate_config(tiny_config(tmp_path, tiny_model, **overrides))
    rows = [to_prompt_completion(r) for r in ROWS * 4]
    trainer = support_trainer(config, tiny_model, tmp_path, rows)
    assert not trainer.fused_head  # the CPU default: the model's own cross-entropy
    batch = next(itertools.islice(trainer.get_train_dataloader(), 1))
    items = 3 * (batch["labels"][:, 1:] != -100).sum()  # the trained tokens of 3 accumulated micro-batches
    model = trainer.model.eval()  # no LoRA dropout: the two forwards must see the same network
    with torch.no_grad():
        expected = Trainer.compute_loss(trainer, model, dict(batch), num_items_in_batch=items)
        add_fused_lm_head(model.get_base_model(), outputs=("log_probs",))
        trainer.fused_head = True
        fused = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
    torch.testing.assert_close(fused, expected, atol=1e-4, rtol=1e-4)
    assert 1 < float(expected) < 10  # a random model's loss over the vocabulary, a third of it: not a zero


def test_cpu_defaults_avoid_bf16_and_checkpointing(tmp_path, tiny_model):
    config = validate_config(tiny_config(tmp_path, tiny_model, **{"train.device": "cpu"}))
    assert device_defaults(config.train) == {"use_cpu": True, "bf16": False, "gradient_checkpointing": False}
    forced = validate_config(tiny_config(tmp_path, tiny_model, **{"train.device": "cpu", "train.bf16": True}))
    assert device_defaults(forced.train)["bf16"] is True


def test_row_without_final_assistant_turn_is_rejected():
    from pipeline.console import PipelineError

    with pytest.raises(PipelineError, match="assistant"):
        to_prompt_completion({"prompt_id": "p1", "messages": [{"role": "user", "content": "hi"}]})


def test_retrain_only_when_the_data_moved_past_the_threshold(tmp_path, tiny_model, capsys):
    import json

    from pipeline.train import run_train

    raw = tiny_config(tmp_path, tiny_model)
    raw["train"].update({"max_steps": 1, "retrain_min_change": 0.25, "merge": False})
    raw["tracking"] = {"wandb": False}
    config = validate_config(raw)

    def write(rows):
        write_filtered(config, rows)

    def trained_at():
        return json.loads((config.run_dir / "train" / "manifest.json").read_text())["started_at"], (
            config.run_dir / "train" / "adapter"
        ).stat().st_mtime_ns

    write(ROWS)
    run_train(config)
    first = trained_at()
    write(ROWS + [ROWS[0] | {"messages": ROWS[0]["messages"][:2] + [{"role": "assistant", "content": "New."}]}])
    run_train(config)  # 1 of 8 examples added: 12.5% < 25%
    assert (
        trained_at() == first and "the training data moved 12.5% < train.retrain_min_change" in capsys.readouterr().err
    )

    write(ROWS[:5])  # 3 of 8 removed: 37.5%
    run_train(config)
    assert trained_at() != first

    raw["train"]["learning_rate"] = 1e-3  # a config change always retrains, however little the data moved
    second = trained_at()
    run_train(validate_config(raw))
    assert trained_at() != second


def test_a_killed_training_resumes_from_its_last_checkpoint(tmp_path, tiny_model):
    import json

    import yaml

    from pipeline.train import run_train

    raw = tiny_config(tmp_path, tiny_model)
    max_steps = 60
    raw["train"].update({"max_steps": max_steps, "save_steps": 2, "merge": False, "logging_steps": 1})
    raw["tracking"] = {"wandb": False}
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    config = validate_config(raw)
    write_filtered(config, ROWS)

    checkpoints = config.run_dir / "train" / "checkpoints"
    kill_midway(
        ["train", "--config", str(config_file)],
        lambda: (checkpoints / "checkpoint-6" / "trainer_state.json").exists(),
        "training",
    )
    saved = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    assert saved and saved[-1] < max_steps

    run_train(config)
    metrics = json.loads((config.run_dir / "train" / "manifest.json").read_text())["metrics"]
    assert metrics["resumed_from"] == f"checkpoint-{saved[-1]}" and metrics["steps"] == max_steps
    history = json.loads((config.run_dir / "train" / "train_metrics.json").read_text())["log_history"]
    steps = [entry["step"] for entry in history if "loss" in entry]
    assert steps == sorted(set(steps)) and steps[-1] == max_steps  # the count went on, nothing logged twice
    assert not checkpoints.exists()  # finished: checkpoints cleaned up, the adapter is the output


@pytest.fixture(scope="session")
def ping_pong_student_bf16(tmp_path_factory, tokenizer):
    """The ping-pong student trained on the CUDA defaults' precision path, here on the CPU: frozen base weights in
    bf16, the LoRA adapter in fp32, under bf16 autocast."""
    return train_ping_pong(tmp_path_factory.mktemp("ping-pong-bf16"), tokenizer, bf16=True)


STUDENTS = {
    "device default": "ping_pong_student",
    "bf16": "ping_pong_student_bf16",
    "base model without a chat template": "ping_pong_base_student",
    "EOS unlike the template's end of turn": "ping_pong_qwen_like_student",
}


@pytest.mark.parametrize("student", list(STUDENTS))
def test_a_tuned_tiny_model_learns_to_stop(request, student):
    """Overfit a few examples, merge, generate: the tuned model answers and ends with EOS before max_tokens,
    where the untuned random model runs to the limit. Catches EOS masked out of the loss (pad == EOS here).
    In bf16 too: on an H200 the student of an earlier version of this test never stopped (`ongong...`). And from
    a base model, which has no chat template: the plain one the pipeline gives it must end its turns with EOS.
    And from a model whose EOS is not its template's end of turn (Qwen2.5 base): it answered `Pong.\nPong.\n...`
    to the limit, the `<|im_end|>` it learned after each one not a stop token, until the tuned student's
    generation config stopped at it."""
    from transformers import AutoTokenizer

    from pipeline.chat_templates import PLAIN_CHAT_TEMPLATE
    from pipeline.config import EngineConfig, SamplingConfig
    from pipeline.engines import load_engine

    base, _, tuned = request.getfixturevalue(STUDENTS[student])
    if student.startswith("base model"):  # served as it was trained: with the template its folder keeps
        assert AutoTokenizer.from_pretrained(tuned).chat_template == PLAIN_CHAT_TEMPLATE.read_text()
    prompts = [ping(3), ping(42)]
    greedy = SamplingConfig(max_tokens=20)
    for model, expected in ((base, "length"), (tuned, "stop")):
        engine = load_engine(str(model), EngineConfig(backend="transformers"), seed=0)
        finishes = {g.completions[0].finish_reason for g in engine.generate(prompts, greedy, progress=False)}
        assert finishes == {expected}, (model, finishes)
    (answer, *_), *_ = [g.completions for g in engine.generate(prompts[:1], greedy, progress=False)]
    assert answer.text == "Pong." and answer.output_tokens < 20


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_saved_student_stops_at_its_templates_end_of_turn(tmp_path, tokenizer, qwen_like_tokenizer, method):
    """When the EOS token is not the one the chat template closes a turn with (Qwen2.5 base: `<|endoftext|>`
    against `<|im_end|>`), the train stage saves the latter among the tuned student's stop tokens, merged or
    fully tuned; a student whose template closes turns with its EOS keeps its generation config as it was."""
    import json

    from pipeline.train import run_train

    qwen_like = qwen_like_tokenizer
    for tok, expected in ((qwen_like, [qwen_like.eos_token_id, tokenizer.eos_token_id]), (tokenizer, None)):
        model = build_tiny_model(tmp_path / f"model-{tok.eos_token_id}", tok)
        config = validate_config(
            tiny_config(tmp_path / str(tok.eos_token_id), model, **{"train.max_steps": 1, "train.method": method})
        )
        write_filtered(config, ROWS)
        run_train(config)
        saved = json.loads((config.layout.merged / "generation_config.json").read_text())["eos_token_id"]
        assert saved == (expected or tokenizer.eos_token_id), (tok.eos_token, saved)


def test_the_student_trains_with_the_chat_template_it_is_served_with(tmp_path, tiny_model):
    """benchmark.engine.chat_template, the student's serving template, is its training template too, and part of
    the train stage's fingerprint; unset, the student's own template is used as TRL loads it."""
    from pipeline.train.stage import train_stage
    from pipeline.train.trainer import student_tokenizer

    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    own = validate_config(tiny_config(tmp_path, tiny_model))
    served = validate_config(tiny_config(tmp_path, tiny_model, **{"benchmark.engine.chat_template": template}))
    assert student_tokenizer(own.benchmark.engine.chat_template, str(tiny_model)) is None
    assert student_tokenizer(served.benchmark.engine.chat_template, str(tiny_model)).chat_template == template
    assert train_stage(served).fingerprint != train_stage(own).fingerprint
    batch = validate_config(tiny_config(tmp_path, tiny_model, **{"benchmark.engine.batch_size": 3}))
    assert train_stage(batch).fingerprint == train_stage(own).fingerprint  # how it is served is not training's


@pytest.mark.parametrize("adds_bos", [True, False])
def test_a_base_student_trains_behind_the_bos_its_tokenizer_adds(request, tmp_path, adds_bos):
    """A base model has no chat template; the plain one it gets leads with the BOS token where its tokenizer starts
    plain text with one (Gemma, Llama, Mistral), since TRL tokenizes a rendered chat without special tokens and
    such a model without its BOS is off its pre-training distribution (Gemma 3 270M base completes "The capital of
    France is" with "France. The The The..."). Exactly one BOS; none where the tokenizer adds none (SmolLM2)."""
    tok = request.getfixturevalue("bos_base_tokenizer" if adds_bos else "base_tokenizer")
    model = build_tiny_model(tmp_path / "base", tok)
    trainer = support_trainer(validate_config(tiny_config(tmp_path, model)), model, tmp_path)
    for example in trainer.train_dataset:
        ids = example["input_ids"]
        assert (ids[0] == tok.bos_token_id) is adds_bos and ids.count(tok.bos_token_id) == int(adds_bos), ids[:4]


def test_a_run_shorter_than_logging_steps_records_its_first_and_last_loss(tmp_path, tiny_model):
    """3 steps with logging_steps 5: the first and the last step's losses are logged all the same (a real data
    set that left 2 examples ran 3 steps and recorded `loss None -> None`)."""
    import json

    from pipeline.train import run_train

    raw = tiny_config(tmp_path, tiny_model, **{"train.merge": False})
    raw["train"].update({"max_steps": 3, "logging_steps": 5})
    config = validate_config(raw)
    write_filtered(config, ROWS)
    run_train(config)
    metrics = json.loads((config.run_dir / "train" / "train_metrics.json").read_text())
    assert [e["step"] for e in metrics["log_history"] if "loss" in e] == [1, 3]
    assert metrics["first_loss"] is not None and metrics["last_loss"] is not None
    assert metrics["first_loss"] != metrics["last_loss"]
    if metrics.get("accelerator") is None:  # the CPU defaults, as resolved (a GPU's: test_a_cuda_training_records_...)
        options = ("bf16", "fused_lm_head", "liger_kernels", "gradient_checkpointing")
        assert {key: metrics[key] for key in options} == dict.fromkeys(options, False)


def test_the_stage_after_training_starts_with_the_trainers_memory_handed_back(tmp_path, tiny_model, tokenizer):
    """`distill run` (the nightly job, a notebook) runs stage after stage in one process. The trainer's model sat in
    reference cycles after the train stage returned, alive until the collector next ran; on a GPU (scripts/
    gpu_check.sh runs this test there) PyTorch then kept its memory cached, taken from the benchmark's vLLM, which
    sizes itself from the GPU's free memory. Entering the next stage (here the benchmark's) hands it back."""
    import gc

    import torch
    from transformers import PreTrainedModel

    from pipeline.benchmark.stage import benchmark_stage
    from pipeline.tasks import task_for
    from pipeline.train import run_train

    def models() -> dict[int, str]:
        return {id(o): type(o).__name__ for o in gc.get_objects() if isinstance(o, PreTrainedModel)}

    cuda = torch.cuda.is_available()
    # On a GPU, wide enough (~235M parameters: 470 MB in bf16) for a leak to stand out from what PyTorch keeps by
    # design: cuBLAS and cuBLASLt scratch space, up to 32 MiB each per thread on Hopper (the forward's thread and
    # autograd's), created here if no test before this one used the GPU.
    model = build_tiny_model(tmp_path / "wide", tokenizer, hidden_size=2048) if cuda else tiny_model
    raw = tiny_config(tmp_path, model)  # merged too: the merge loads the model a second time
    raw["train"].update({"max_steps": 2})
    config = validate_config(raw)
    write_filtered(config, ROWS)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    before_models, before_reserved = models(), torch.cuda.memory_reserved() if cuda else 0
    gc.disable()  # the collector's own timing out of the way: what is left is what only an explicit pass frees
    try:
        run_train(config)
        assert (config.run_dir / "train" / "merged").is_dir()
        assert set(models()) - set(before_models), "nothing left to hand back: this test would prove nothing"
        with benchmark_stage(config, task_for(config)):
            left = {key: name for key, name in models().items() if key not in before_models}
            assert not left, f"models still alive as the next stage starts: {sorted(left.values())}"
            if cuda:
                kept = (torch.cuda.memory_reserved() - before_reserved) / 2**20
                assert kept < 256, f"PyTorch still holds {kept:.0f} MiB of the train stage's GPU memory"
    finally:
        gc.enable()


def test_a_max_length_that_leaves_no_completion_token_is_refused_in_one_line(tmp_path, tiny_model):
    """Prompts longer than train.max_length leave TRL nothing to train on: a PipelineError naming the key, not
    torch's `num_samples=0` from deep in the data loader."""
    from pipeline.console import PipelineError

    config = validate_config(tiny_config(tmp_path, tiny_model, **{"train.max_length": 16}))
    with pytest.raises(PipelineError, match=r"^train.max_length: no training example keeps a completion token"):
        support_trainer(config, tiny_model, tmp_path)


def test_examples_longer_than_max_length_are_counted_as_trl_cuts_them(tmp_path, tiny_model, capsys):
    """TRL cuts examples at train.max_length (the answer's end-of-turn token goes) and drops those left with no
    answer token, without a word: the stage counts them as TRL does, says so in one line and records it."""
    import json

    from pipeline.train import run_train
    from pipeline.train.data import max_length_overflow

    long_answer = "Thank you for contacting Acme support. " * 12  # ~120 tokens in all: cut at 96
    long_question = "My parcel never arrived and nobody answers my emails. " * 10  # the prompt alone > 96
    rows = ROWS[:4] + [
        {"messages": [*ROWS[4]["messages"][:2], {"role": "assistant", "content": long_answer}]},
        {"messages": [ROWS[5]["messages"][0], {"role": "user", "content": long_question}, ROWS[5]["messages"][2]]},
    ]
    raw = tiny_config(tmp_path, tiny_model, **{"train.merge": False})
    raw["train"].update({"max_steps": 1, "max_length": 96})  # the other examples: 64 tokens
    config = validate_config(raw)
    examples = [to_prompt_completion(r) for r in rows]
    trainer = support_trainer(config, tiny_model, tmp_path, examples)
    overflow = max_length_overflow(trainer.processing_class, examples, 96)
    assert overflow["over_max_length"] == 2 and overflow["without_answer_token"] == 1
    assert overflow["longest_tokens"] > 96
    assert len(trainer.train_dataset) == len(rows) - 1  # TRL dropped the one without an answer token
    assert sorted(len(r["input_ids"]) for r in trainer.train_dataset) == [64, 64, 64, 64, 96]  # and cut the other

    write_filtered(config, rows)
    run_train(config)
    assert "train.max_length=96 cuts 2 of 6 training examples" in capsys.readouterr().err
    metrics = json.loads((config.run_dir / "train" / "train_metrics.json").read_text())
    assert metrics["max_length_overflow"] == overflow


def test_bf16_lora_keeps_the_base_in_bf16_and_the_adapter_in_fp32(tmp_path, tiny_model):
    """The precision path of the CUDA defaults: frozen weights loaded in bf16 (half the memory traffic of fp32
    weights cast under autocast every step), trainable LoRA weights and their optimizer state in fp32."""
    import torch

    config = validate_config(tiny_config(tmp_path, tiny_model, **{"train.bf16": True}))
    trainer = support_trainer(config, tiny_model, tmp_path)
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert trainer.args.bf16 and not trainer.args.gradient_checkpointing


def test_early_stopping_keeps_the_best_checkpoint(tmp_path, tiny_model):
    """Validation at every step, patience 2, a learning rate that overshoots: training stops well before
    max_steps once val loss stops improving, and the best checkpoint is the one loaded."""
    import json

    from pipeline.train import run_train

    raw = tiny_config(tmp_path, tiny_model)
    raw["train"].update(
        {"max_steps": 80, "learning_rate": 0.3, "save_steps": 1, "early_stopping_patience": 2, "merge": False}
    )
    raw["tracking"] = {"wandb": False}
    config = validate_config(raw)
    write_filtered(config, ROWS[:6], ROWS[6:])
    run_train(config)
    metrics = json.loads((config.run_dir / "train" / "manifest.json").read_text())["metrics"]
    evals = metrics["eval_losses"][:-1]  # the last entry is the final evaluate() of the loaded model
    assert metrics["steps"] < 80, metrics["steps"]
    best = min(evals)
    assert metrics["best_checkpoint"] == f"checkpoint-{evals.index(best) + 1}"
    assert metrics["eval_losses"][-1] == pytest.approx(best, rel=1e-4)  # the best model is the one kept

    raw["filter"] = {"val_fraction": 0.0}
    raw["train"]["early_stopping_patience"] = 2
    write_filtered(config, ROWS[:6])
    with pytest.raises(Exception, match="train.early_stopping_patience: needs a val split"):
        run_train(validate_config(raw), force=True)


def test_packed_examples_keep_their_unpacked_loss(tmp_path, tiny_model):
    """Packing puts several examples in one row; through the varlen attention (the default when packing) none
    attends to another: each trained token's loss in the packed row equals its loss when the example runs alone."""
    import torch

    raw = tiny_config(tmp_path, tiny_model, **{"train.packing": True, "train.per_device_train_batch_size": 8})
    config = validate_config(raw)
    trainer = support_trainer(config, tiny_model, tmp_path)
    assert trainer.model.config._attn_implementation == "varlen"
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch, "padding-free: one flat row"
    positions = batch["position_ids"][0]
    starts = [*(positions == 0).nonzero().flatten().tolist(), positions.numel()]
    assert len(starts) - 1 == len(ROWS), "every example packed into the row"
    assert batch["cu_seq_lens_q"].tolist() == starts

    model = trainer.model.eval()
    # On a GPU the model is bf16 (the CUDA defaults) and the kernels differ: looser, but far below the leak.
    tolerance = 1e-4 if next(model.parameters()).dtype == torch.float32 else 3e-2
    device = next(model.parameters()).device

    def token_losses(input_ids, labels, **extra):
        extra = {k: v.to(device) if hasattr(v, "to") else v for k, v in extra.items()}
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), **extra).logits[0, :-1].float().cpu()
        return torch.nn.functional.cross_entropy(logits, labels[0, 1:], reduction="none", ignore_index=-100)

    ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    bounds = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    packed = token_losses(ids, labels, position_ids=batch["position_ids"], **bounds)
    from_positions = token_losses(ids, labels, position_ids=batch["position_ids"])  # boundaries read from these
    torch.testing.assert_close(from_positions, packed, rtol=tolerance, atol=tolerance)
    for begin, end in zip(starts, starts[1:], strict=False):
        alone = token_losses(ids[:, begin:end], labels[:, begin:end])
        trained = labels[0, begin + 1 : end] != -100
        assert trained.sum() > 5
        torch.testing.assert_close(packed[begin : end - 1][trained], alone[trained], rtol=tolerance, atol=tolerance)
    # And the control: without restarting positions or boundaries the same packed row does attend across examples.
    leaky = token_losses(ids, labels, position_ids=torch.arange(ids.shape[1])[None])
    assert not torch.allclose(leaky[starts[1] :], packed[starts[1] :], atol=1e-3)


def test_packing_never_goes_through_a_dense_mask(tmp_path, tiny_model):
    """A padding-free row through sdpa or eager attends through one (tokens x tokens) mask (13.8 GiB for 16k
    tokens on an H200): refused in one line that names the fix. Missing optional kernels are one line too."""
    import importlib.util

    from pipeline.console import PipelineError

    for attention in ("sdpa", "eager"):
        config = validate_config(
            tiny_config(tmp_path, tiny_model, **{"train.packing": True, "train.attn_implementation": attention})
        )
        with pytest.raises(PipelineError, match=r"train.packing: .*leave train.attn_implementation unset \(varlen\)"):
            support_trainer(config, tiny_model, tmp_path)
    missing = {
        "train.attn_implementation=flash_attention_2": ("flash_attn", "needs the flash-attn package"),
        "train.attn_implementation=kernels-community/flash-attn2": ("kernels", "needs the kernels package"),
        "train.use_liger_kernel=true": ("liger_kernel", "needs the liger-kernel package"),
    }
    for override, (module, message) in missing.items():
        if importlib.util.find_spec(module) is not None:
            continue  # installed here: nothing to refuse
        key, value = override.split("=")
        config = validate_config(tiny_config(tmp_path, tiny_model, **{key: value == "true" or value}))
        with pytest.raises(PipelineError, match=message):
            support_trainer(config, tiny_model, tmp_path)
    with pytest.raises(ValueError, match="attn_implementation"):
        validate_config(tiny_config(tmp_path, tiny_model, **{"train.attn_implementation": "flash"}))


def test_liger_kernels_are_on_by_default_only_where_they_were_measured(monkeypatch):
    """Unset, Liger is on for packed LoRA and full SFT on CUDA when installed; off unpacked, on the CPU, for QLoRA
    and KD, or when the package is missing; an explicit value wins. The CUDA device and the package are faked."""
    import importlib.util

    from pipeline.config import TrainConfig
    from pipeline.train.options import fast_path_options

    real_find_spec = importlib.util.find_spec
    installed = {"liger_kernel": True}
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (object() if installed[name] else None) if name in installed else real_find_spec(name, *a),
    )
    cuda, cpu = {"use_cpu": False}, {"use_cpu": True}

    def liger(device, packing=True, **train):
        return fast_path_options(TrainConfig(packing=packing, **train), device)["use_liger_kernel"]

    assert liger(cuda) and liger(cuda, method="full")
    assert not liger(cuda, packing=False) and liger(cuda, packing=False, use_liger_kernel=True)
    assert not liger(cpu) and not liger(cuda, method="qlora") and not liger(cuda, objective="kd")
    assert not liger(cuda, use_liger_kernel=False)
    installed["liger_kernel"] = False
    assert not liger(cuda)


def test_the_stage_leaves_the_students_model_code_as_it_found_it(monkeypatch, tmp_path, tiny_model):
    """Liger kernels, applied when the trainer is built on CUDA, replace the student's modeling module's RoPE and
    RMSNorm for the whole process, and a later Llama on the CPU then fails inside Triton (seen on an H200). No Triton
    here: Liger's patching is imitated inside the real build_trainer, with the stock functions under new names
    (and the real kernels kept off on a GPU, where they would replace the imitation: seen on an H200). Training
    runs on them; after the stage, a new Llama is the stock one again."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    from pipeline.train import run_train, stage

    rope, norm = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm
    calls = []

    def liger_rope(*args, **kwargs):
        calls.append(1)
        return rope(*args, **kwargs)

    def build_with_liger(*args, **kwargs):
        modeling_llama.apply_rotary_pos_emb = liger_rope  # as Liger's apply, called while the trainer is built
        modeling_llama.LlamaRMSNorm = type("LigerRMSNorm", (norm,), {})
        return build_trainer(*args, **kwargs)

    monkeypatch.setattr(stage, "build_trainer", build_with_liger)
    raw = tiny_config(tmp_path, tiny_model, **{"train.merge": False, "train.use_liger_kernel": False})
    raw["train"]["max_steps"] = 1
    config = validate_config(raw)
    write_filtered(config, ROWS)
    run_train(config)
    assert calls, "the imitated kernels did not run in training: the test checks nothing"
    assert modeling_llama.apply_rotary_pos_emb is rope and modeling_llama.LlamaRMSNorm is norm
    calls.clear()
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model(torch.tensor([[1, 2, 3]]))
    assert type(model.model.norm) is norm and not calls


def test_out_of_gpu_memory_names_the_keys_that_fix_it():
    """A CUDA out-of-memory error (raised by a stand-in trainer: there is no GPU here) becomes one line naming
    gradient checkpointing and the batch size."""
    from types import SimpleNamespace

    import torch

    from pipeline.config import TrainConfig
    from pipeline.console import PipelineError
    from pipeline.train.stage import _train

    def out_of_memory(**_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 13.80 GiB")

    with pytest.raises(PipelineError, match=r"train.gradient_checkpointing=true, or lower train.per_device_train"):
        _train(SimpleNamespace(train=out_of_memory), TrainConfig(), None)
    # a CUDA run whose size rule left TRL's fused LM head off: that key first
    lean = SimpleNamespace(train=out_of_memory, fused_head=False)
    with pytest.raises(PipelineError, match=r"set train.fused_lm_head=true, or set train.gradient_checkpointing"):
        _train(lean, TrainConfig(), None)


def test_the_fused_lm_head_goes_on_by_the_size_of_the_logits():
    """Unset, the fused head is on when a full batch's logits would take more than an eighth of the GPU's memory:
    not for the gpu_check 0.4B shape (49k vocabulary, 16 x 1024 tokens, 7.5 GiB) on an H200, but for Qwen's 152k
    vocabulary on a 24 GB L4 and for a 7B run of 8 x 4096 tokens on an 80 GB H100. Set, the key wins."""
    from pipeline.config import TrainConfig
    from pipeline.train.options import fused_head_wanted

    gib = 2**30
    gpu_check = TrainConfig(per_device_train_batch_size=16, max_length=1024)
    assert not fused_head_wanted(gpu_check, 49_152, 141 * gib)
    assert fused_head_wanted(gpu_check, 151_936, 24 * gib)
    assert fused_head_wanted(TrainConfig(per_device_train_batch_size=8, max_length=4096), 151_936, 80 * gib)
    assert fused_head_wanted(TrainConfig(fused_lm_head=True), 49_152, 141 * gib)
    assert not fused_head_wanted(TrainConfig(fused_lm_head=False, max_length=65_536), 151_936, 24 * gib)


def test_training_throughput_and_mfu_metrics(monkeypatch, tmp_path, tiny_model):
    """train_metrics.json carries tokens/s; on a CUDA device the datasheet table knows, MFU against its peak.
    The CUDA device is faked (its name only): there is no GPU here."""
    import pipeline.hardware as hardware
    from pipeline.train.stage_trainer import model_parameters, throughput_metrics

    config = validate_config(tiny_config(tmp_path, tiny_model))
    trainer = support_trainer(config, tiny_model, tmp_path)
    trainer.state.log_history = [{"num_tokens": 500.0}, {"num_tokens": 1000.0}]
    # The tiny model's untied input embedding table is looked up, not multiplied: not in the FLOPs.
    params = sum(p.numel() for p in trainer.model.parameters()) - trainer.model.get_input_embeddings().weight.numel()
    assert model_parameters(trainer.model) == params
    profiles = config.benchmark.hardware_profiles
    monkeypatch.setattr(hardware, "cuda_accelerator", lambda: None)  # as on this CPU, also when run on a GPU
    assert throughput_metrics(trainer, 2.0, False, profiles) == {
        "train_tokens": 1000,
        "train_tokens_per_s": 500.0,
        "gpus": 0,
    }

    h100 = ("NVIDIA H100 80GB HBM3", hardware.accelerator_for("NVIDIA H100 80GB HBM3"))
    monkeypatch.setattr(hardware, "cuda_accelerator", lambda: h100)
    monkeypatch.setattr(trainer.args, "use_cpu", False)
    metrics = throughput_metrics(trainer, 2.0, False, profiles)
    assert metrics["accelerator"] == "NVIDIA H100 80GB HBM3" and metrics["peak_tflops"] == 989.0
    assert metrics["mfu"] == pytest.approx(round(500.0 * 4 * params / 989e12, 4))
    assert hardware.accelerator_for("NVIDIA A100-SXM4-40GB").memory_gbps == 1555.0
    assert hardware.accelerator_for("NVIDIA GeForce RTX 4090") is None
    # An A10G has no published compute peak: named, but no utilisation against a peak it lacks.
    a10g = ("NVIDIA A10G", hardware.accelerator_for("NVIDIA A10G"))
    monkeypatch.setattr(hardware, "cuda_accelerator", lambda: a10g)
    assert throughput_metrics(trainer, 2.0, False, profiles) == {
        "train_tokens": 1000,
        "train_tokens_per_s": 500.0,
        "accelerator": "NVIDIA A10G",
        "gpus": 1,
        "hardware_profile": "a10g",
    }


@pytest.mark.cuda
def test_varlen_kernel_matches_attention_per_example():
    """On CUDA the packed row goes through PyTorch's FlashAttention varlen kernel: its output equals causal sdpa
    run on each example alone (GQA: 14 query heads over 2 key/value heads, as Qwen2.5-0.5B)."""
    import torch
    import torch.nn.functional as F

    from pipeline.train.attention import cuda_kernel_available, varlen_attention

    assert cuda_kernel_available(), "torch.nn.attention.varlen is missing from this torch"
    torch.manual_seed(0)
    lengths = [37, 120, 5, 300]
    total = sum(lengths)
    q = torch.randn(1, 14, total, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, total, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    out, _ = varlen_attention(None, q, k, v, None, scaling=0.125, cu_seq_lens_q=bounds, max_length_q=max(lengths))
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        ref = F.scaled_dot_product_attention(
            q[:, :, a:b],
            k[:, :, a:b].repeat_interleave(7, 1),
            v[:, :, a:b].repeat_interleave(7, 1),
            is_causal=True,
            scale=0.125,
        )
        torch.testing.assert_close(out[0, a:b], ref[0].transpose(0, 1), atol=2e-2, rtol=2e-2)


def test_packed_attention_compiles_the_same_graphs_for_any_number_of_examples():
    """Under `train.torch_compile`, packed rows bring a new number of examples nearly every step. The CPU path's
    loop over them stays out of the graph: traced, it recompiled the model for each new count (a 24-layer student
    on this CPU: 16 s a time, 26 recompilations in 16 steps). Counted with a backend that only counts graphs."""
    import torch

    from pipeline.train.attention import varlen_attention

    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(varlen_attention, backend=counting_backend)
    torch.manual_seed(0)
    for lengths in ([5, 9], [3, 4, 6], [2, 2, 2, 7], [8, 1, 3, 2, 4], [1, 1, 1, 1, 1, 9], [4, 4, 4, 4, 4, 4, 3]):
        total = sum(lengths)
        q, k, v = (torch.randn(1, 2, total, 8) for _ in range(3))
        bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        kwargs = {"scaling": 0.35, "cu_seq_lens_q": bounds, "max_length_q": max(lengths)}
        torch.testing.assert_close(
            compiled(None, q, k, v, None, **kwargs)[0], varlen_attention(None, q, k, v, None, **kwargs)[0]
        )
    # the graphs before and after the loop, each for the first row's shapes and again made dynamic (traced: 8)
    assert len(graphs) <= 4
    torch._dynamo.reset()


def test_torch_compile_compiles_each_decoder_layer_in_place_and_trains_as_eager(tmp_path, tiny_model):
    """`train.torch_compile` compiles the repeated decoder layers one by one, in place (one compilation serves
    them all: the whole model compiled took 123 + 165 s for its first two steps of SmolLM2-135M on this CPU, its
    layers 17 + 21 s). In place, the model keeps its own modules and weight names, so TRL's patched forward runs
    the compiled layers and the adapter saves as it would uncompiled; the losses are eager's."""
    import torch
    import torch._dynamo.utils

    from pipeline.train.options import speed_options

    losses = {}
    for compiled in (False, True):
        overrides = {"train.max_steps": 3, "train.logging_steps": 1, "train.torch_compile": compiled}
        trainer = support_trainer(validate_config(tiny_config(tmp_path, tiny_model, **overrides)), tiny_model, tmp_path)
        torch._dynamo.utils.counters.clear()
        trainer.train()
        losses[compiled] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        layers = trainer.model.get_base_model().model.layers
        assert all((layer._compiled_call_impl is not None) == compiled for layer in layers)
        assert bool(torch._dynamo.utils.counters["stats"]["unique_graphs"]) == compiled
        assert speed_options(trainer)["torch_compile"] == compiled
        assert not any("_orig_mod" in name for name in trainer.model.state_dict())
    assert len(losses[True]) == 3
    rounding = 2e-2 if trainer.args.bf16 else 2e-3  # fused kernels round differently (bf16: the CUDA default)
    assert losses[True] == pytest.approx(losses[False], rel=rounding)
    torch._dynamo.reset()  # the compiled layers' caches hold the model


@pytest.mark.cuda
def test_a_cuda_training_records_its_mfu(tmp_path, tiny_model):
    """On a GPU the train stage runs the CUDA defaults, packed, and train_metrics.json names the device, its MFU
    and the options the defaults chose: bf16, Liger's kernels where installed, no fused head for so small a model
    (its logits take a sliver of the GPU), no checkpointing."""
    import json

    from pipeline.train import run_train
    from pipeline.train.options import installed

    raw = tiny_config(tmp_path, tiny_model, **{"train.merge": False, "train.packing": True})
    raw["tracking"] = {"wandb": False}
    config = validate_config(raw)
    write_filtered(config, ROWS)
    run_train(config)
    metrics = json.loads((config.run_dir / "train" / "train_metrics.json").read_text())
    assert metrics["train_tokens_per_s"] > 0 and metrics["accelerator"]
    assert 0 < metrics["mfu"] < 1 and metrics["gpus"] == 1
    assert metrics["bf16"] and not metrics["fused_lm_head"] and not metrics["gradient_checkpointing"]
    assert metrics["liger_kernels"] == installed("liger_kernel")


def test_full_fine_tuning_saves_the_whole_model(tmp_path, tiny_model):

    from safetensors import safe_open

    from pipeline.train import run_train

    raw = tiny_config(tmp_path, tiny_model, **{"train.method": "full", "train.max_steps": 2})
    config = validate_config(raw)
    write_filtered(config, ROWS)
    run_train(config)
    merged = config.run_dir / "train" / "merged"
    assert not (config.run_dir / "train" / "adapter").exists()
    with (
        safe_open(merged / "model.safetensors", "pt") as tuned,
        safe_open(tiny_model / "model.safetensors", "pt") as base,
    ):
        names = [n for n in tuned.keys() if "layers.0.mlp.down_proj" in n]
        assert names and not any("lora" in n for n in tuned.keys())
        assert not (tuned.get_tensor(names[0]) == base.get_tensor(names[0])).all(), "full FT moved base weights"


def test_qlora_on_cpu_is_a_clear_error(tmp_path, tiny_model):
    from pipeline.console import PipelineError

    config = validate_config(tiny_config(tmp_path, tiny_model, **{"train.method": "qlora", "train.device": "cpu"}))
    with pytest.raises(PipelineError, match=r"^train.method: qlora needs a CUDA GPU"):
        support_trainer(config, tiny_model, tmp_path)


@pytest.mark.parametrize("packing", [False, True])
def test_the_trained_token_count_is_the_real_tokens_of_the_batches(tmp_path, tiny_model, packing):
    """Counted on the device and read at each log (no sync per step): the count must still be exact, padded
    (the mask's ones) and packed (the rows' lengths), across a validation's log between two training logs (step 2
    is validated, not logged) and with a step trained after the last regular log."""
    import itertools

    overrides = {"train.max_steps": 4, "train.logging_steps": 3, "train.save_steps": 1, "train.packing": packing}
    config = validate_config(tiny_config(tmp_path, tiny_model, **overrides))
    rows = [to_prompt_completion(r) for r in ROWS * 12]  # packed, 4 rows of 256 tokens hold ~16 examples
    trainer = support_trainer(config, tiny_model, tmp_path, rows, val=rows[:2])
    batches = list(itertools.islice(trainer.get_train_dataloader(), 4))
    assert len(batches) == 4  # all in the first epoch
    real = [int(b["attention_mask"].sum()) if "attention_mask" in b else b["position_ids"].size(1) for b in batches]
    assert ("attention_mask" in batches[0]) is not packing
    trainer.train()
    history = trainer.state.log_history
    assert [e["step"] for e in history if "eval_loss" in e] == [1, 2, 3, 4]
    logged = [(e["step"], e["num_tokens"]) for e in history if "num_tokens" in e]
    assert logged == [(1, real[0]), (3, sum(real[:3])), (4, sum(real))]


def test_the_flops_estimate_counts_the_parameters_once(tmp_path, tiny_model):
    """`total_flos` stays transformers' estimate (6 x input tokens x non-embedding parameters) while the parameters
    are counted once a run, not by a walk of every module at every step."""
    import itertools

    config = validate_config(tiny_config(tmp_path, tiny_model, **{"train.max_steps": 2}))
    trainer = support_trainer(config, tiny_model, tmp_path)
    batches = list(itertools.islice(trainer.get_train_dataloader(), 2))
    assert len(batches) == 2  # the steps of one epoch, the batches trained
    parameters = trainer.model.num_parameters(exclude_embeddings=True)
    counts = []
    count = trainer.model.num_parameters
    trainer.model.num_parameters = lambda **kwargs: counts.append(kwargs) or count(**kwargs)
    trainer.train()
    assert trainer.state.total_flos == 6 * sum(b["input_ids"].numel() for b in batches) * parameters
    assert counts == [{"exclude_embeddings": True}]


def test_log_history_carries_tokens_per_second(tmp_path, tiny_model):
    config = validate_config(tiny_config(tmp_path, tiny_model, **{"train.max_steps": 3}))
    trainer = support_trainer(config, tiny_model, tmp_path)
    trainer.train()
    rates = [entry["tokens_per_s"] for entry in trainer.state.log_history if "tokens_per_s" in entry]
    assert len(rates) == 2 and all(rate > 0 for rate in rates)  # every log after the first


def test_training_steps_run_without_cudnn_attention_on_cuda(monkeypatch, tmp_path, tiny_model):
    """Padded batches bring a new length nearly every step, and cuDNN attention plans each one. No GPU here: the
    context is told the device is CUDA (its flags are torch's global state, in CPU builds too)."""
    import torch

    from pipeline import hardware

    real = hardware.attention_without_cudnn
    monkeypatch.setattr(hardware, "attention_without_cudnn", lambda _device: real("cuda"))
    config = validate_config(tiny_config(tmp_path, tiny_model, **{"train.max_steps": 2}))
    trainer = support_trainer(config, tiny_model, tmp_path)
    seen = []
    trainer.model.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    trainer.train()
    assert len(seen) == 2 and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_trl_keeps_its_fused_head_when_liger_kernels_are_on():
    """TRL (1.16) applies only Liger's layer kernels and says so in the config: its fused LM head must then stay on,
    or the run computes the full (tokens x vocabulary) logits. An older Liger setup that fuses the head itself
    replaces it. (Liger needs CUDA: the trainer's arguments are stand-ins.)"""
    from types import SimpleNamespace

    from pipeline.train.options import liger_replaces_the_head

    trl_1_16 = {"fused_linear_cross_entropy": False}
    assert not liger_replaces_the_head(SimpleNamespace(use_liger_kernel=True, liger_kernel_config=trl_1_16))
    assert liger_replaces_the_head(SimpleNamespace(use_liger_kernel=True, liger_kernel_config=None))
    assert not liger_replaces_the_head(SimpleNamespace(use_liger_kernel=False, liger_kernel_config=None))


@pytest.mark.cuda
def test_on_cuda_neither_training_nor_generation_calls_cudnn_attention(tmp_path, tiny_model):
    """cuDNN attention plans every new sequence length (`hardware.attention_without_cudnn`). The control first:
    this GPU's sdpa picks cuDNN for the model's own forward, or there is nothing to avoid here."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pipeline.config import EngineConfig, SamplingConfig
    from pipeline.engines import load_engine

    def attention_ops(run) -> set[str]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        return {event.key for event in prof.key_averages() if "attention" in event.key}

    engine = load_engine(str(tiny_model), EngineConfig(backend="transformers", dtype="bfloat16"), seed=0)
    ids = torch.randint(100, 1000, (2, 33), device=engine.device)
    with torch.no_grad():
        control = attention_ops(lambda: engine.lm(input_ids=ids))
    if not any("cudnn" in op for op in control):
        pytest.skip(f"sdpa does not pick cuDNN for this model on this GPU ({sorted(control)})")
    ping = [[{"role": "user", "content": "Ping"}]]
    generated = attention_ops(lambda: engine.generate(ping, SamplingConfig(max_tokens=4), progress=False))
    engine.close()
    config = validate_config(tiny_config(tmp_path, tiny_model, **{"train.max_steps": 2}))
    trainer = support_trainer(config, tiny_model, tmp_path)
    trained = attention_ops(trainer.train)
    for ops in (generated, trained):
        assert any("scaled_dot_product" in op for op in ops), ops
        assert not any("cudnn" in op for op in ops), ops


def test_per_step_housekeeping_walks_the_model_only_when_its_mode_changes(tmp_path, tiny_model):
    """Transformers' loop puts the model in training mode and zeroes its gradients every step; the stage does both
    over what changes (the mode after an evaluation; the trained weights' gradients). Dropout still trains in every
    training forward and is off in every evaluation, and the model's own methods are back after training."""
    import torch

    config = validate_config(tiny_config(tmp_path, tiny_model, **{"train.max_steps": 4, "train.save_steps": 2}))
    rows = [to_prompt_completion(r) for r in ROWS]
    trainer = support_trainer(config, tiny_model, tmp_path, rows[:6], rows[6:])
    dropout = [m for name, m in trainer.model.named_modules() if name.endswith("lora_dropout.default")][-1]
    seen, walks = [], []  # (grad enabled, dropout training) per forward; the modes a deep module was walked to
    dropout.register_forward_pre_hook(lambda module, _: seen.append((torch.is_grad_enabled(), module.training)))
    dropout.train = lambda mode=True: walks.append(mode) or torch.nn.Module.train(dropout, mode)
    trainer.train()
    training = [mode for grad, mode in seen if grad]
    evaluating = [mode for grad, mode in seen if not grad]
    assert len(training) == 4 and all(training)
    assert evaluating and not any(evaluating)  # two evaluations, at steps 2 and 4
    # The trainer hands over the model in training mode: walked out of it for each evaluation and back in after the
    # first (the step after the second is the last), not at every step (once per step before: True x 4).
    assert walks[:3] == [False, True, False] and walks.count(True) == 1, walks
    assert "train" not in vars(trainer.model) and "zero_grad" not in vars(trainer.model)
    assert all(p.grad is None for p in trainer.model.parameters())


def test_training_runs_with_the_heap_frozen_and_leaves_a_callers_freeze_as_it_was(tmp_path, tiny_model):
    """The objects alive when training starts (the model, the libraries) are out of the garbage collector's full
    collections while it trains, which otherwise walked them all every ~100 steps (288 ms on a host-bound CPU
    stand-in); after it, they are back, unless the caller had frozen them itself."""
    import gc

    from transformers import TrainerCallback

    frozen_during = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            frozen_during.append(gc.get_freeze_count())

    config = validate_config(tiny_config(tmp_path, tiny_model, **{"train.max_steps": 2}))
    trainer = support_trainer(config, tiny_model, tmp_path)
    trainer.add_callback(Watch())
    assert gc.get_freeze_count() == 0
    trainer.train()
    assert len(frozen_during) == 2 and all(count > 100_000 for count in frozen_during), frozen_during
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a caller that froze the heap keeps it frozen
    try:
        trainer.train()
        assert gc.get_freeze_count() > 100_000
    finally:
        gc.unfreeze()


def test_gradients_are_clipped_by_their_norm_over_the_whole_model(tmp_path, tiny_model):
    """The stage clips over the weights that train; frozen weights have no gradient, so the norm and the clipped
    gradients are those of a clip over every parameter, as transformers does it."""
    import torch

    config = validate_config(tiny_config(tmp_path, tiny_model))
    trainer = support_trainer(config, tiny_model, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model(**batch).loss.backward()
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    assert 0 < len(trained) < len(list(trainer.model.parameters()))
    expected_norm = torch.nn.utils.get_total_norm([p.grad for p in trainer.model.parameters() if p.grad is not None])
    trainer.args.max_grad_norm = 1e-3
    norm = trainer._clip_grad_norm(trainer.model)
    assert norm == pytest.approx(float(expected_norm), rel=1e-5) and float(norm) > 1e-3
    clipped = torch.nn.utils.get_total_norm([p.grad for p in trained])
    assert float(clipped) == pytest.approx(1e-3, rel=1e-3)
