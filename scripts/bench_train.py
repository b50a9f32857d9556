"""Our train stage against a plain PyTorch + PEFT loop, side by side in one process, on the same batches.

    .venv/bin/python scripts/bench_train.py [--config configs/smollm2_support.yaml] [--steps 8] [KEY=VALUE ...]

Both train the config's student with the same LoRA settings, learning rate and batches:
- "plain": the same model and LoRA adapter through `peft.get_peft_model`, AdamW, and a loop of forward,
  backward, optimizer step over the first `--steps` batches the trainer's dataloader yields (run first);
- "ours": `build_trainer` (TRL SFTTrainer, as the train stage builds it) and `trainer.train()` for
  `--steps` steps, timed around `train()` (model loading and tokenisation excluded, as for the plain loop).
Throughput is real (non-padding) training tokens per second; the ratio ours / plain is printed. Then the
same with `train.packing=true`: real tokens per step rise, as there is no padding; both throughputs shown.
Data: the run's `filter/train.jsonl` if it exists, else the task's train prompts with canned replies.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def training_rows(config, limit: int) -> list[dict]:
    from pipeline.runs import read_jsonl
    from pipeline.tasks import task_for
    from pipeline.train.trainer import to_prompt_completion

    data = config.layout.train_data
    if data.is_file():
        rows = list(read_jsonl(data))
        print(f"data: {data} ({len(rows)} rows)")
    else:
        task = task_for(config)
        reply = "Thank you for contacting support. Here is what to do next, step by step. "
        rows = [
            {
                "messages": [
                    *task.messages(ex, config.student.prompt_style),
                    {"role": "assistant", "content": reply * (1 + i % 4)},
                ]
            }
            for i, ex in enumerate(task.split("train"))
        ]
        print(f"data: {len(rows)} task prompts with canned replies ({data} not found)")
    # Packing fits several examples per row: repeat a small file so both runs have `limit` examples.
    return [to_prompt_completion(row) for row in itertools.islice(itertools.cycle(rows), limit)]


def real_tokens(batch) -> int:
    """Non-padding tokens: the attention mask's ones, or the flat row's length when padding-free."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def ours(trainer) -> tuple[int, float]:
    """`trainer.train()` as the stage runs it; tokens as TRL counts them (attention-mask ones)."""
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    tokens = [entry["num_tokens"] for entry in trainer.state.log_history if "num_tokens" in entry]
    return int(tokens[-1]), seconds


def plain(config, model_path: str, batches, dtype) -> tuple[int, float]:
    """The loop a user would write by hand: PEFT model, AdamW, forward/backward/step."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = config.train.lora
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.train.learning_rate)
    started = time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    return sum(real_tokens(b) for b in batches), seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/smollm2_support.yaml")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--packed-steps", type=int, default=None, help="steps for the packed run (default --steps)")
    parser.add_argument(
        "--peak-tflops", type=float, help="the accelerator's peak (e.g. 989 for an H100 in bf16): print MFU too"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()

    from pipeline.config import load_config
    from pipeline.models import resolve_model
    from pipeline.train.trainer import build_trainer

    steps = f"train.max_steps={args.steps}"
    base = [
        *args.overrides,
        "tracking.wandb=false",
        steps,
        "train.save_steps=100000",
        f"train.logging_steps={args.steps}",
    ]
    config = load_config(args.config, base)
    model_path = resolve_model(config.student.model)
    batch = config.train.per_device_train_batch_size * config.train.gradient_accumulation_steps
    rows = training_rows(config, args.steps * batch * 16)  # enough for --steps packed steps

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for packing in (False, True):
            count = (args.packed_steps or args.steps) if packing else args.steps
            overrides = [*base, f"train.packing={str(packing).lower()}", f"train.max_steps={count}"]
            packed_config = load_config(args.config, [*overrides, f"train.logging_steps={count}"])
            trainer = build_trainer(packed_config, model_path, rows, [], Path(tmp) / f"out-{packing}")
            batches = list(itertools.islice(trainer.get_train_dataloader(), count))
            dtype = next(trainer.model.parameters()).dtype
            plain_tokens, plain_seconds = plain(packed_config, model_path, batches, dtype)
            tokens, seconds = ours(trainer)
            results[packing] = (tokens / seconds, plain_tokens / plain_seconds, tokens / len(batches))
            name = "packed  " if packing else "unpacked"
            print(
                f"{name} ours : {tokens} real tokens in {seconds:.1f} s = {tokens / seconds:.0f} tok/s "
                f"({tokens / len(batches):.0f} real tokens/step, {len(batches)} steps)"
            )
            plain_rate = plain_tokens / plain_seconds
            print(f"{name} plain: {plain_tokens} real tokens in {plain_seconds:.1f} s = {plain_rate:.0f} tok/s")
            print(f"{name} ratio ours/plain = {results[packing][0] / results[packing][1]:.3f}")
            if args.peak_tflops:
                # Per trained token: forward 2N FLOPs, backward 2N (activation gradients) + 2N more when every
                # weight gets a gradient (full fine-tuning); LoRA's own matrices are negligible.
                params = sum(p.numel() for p in trainer.model.parameters())
                per_token = (6 if packed_config.train.method == "full" else 4) * params
                mfu = tokens / seconds * per_token / (args.peak_tflops * 1e12)
                print(f"{name} model FLOPs utilisation: {mfu:.1%} of {args.peak_tflops:g} TFLOP/s")
    gain = results[True][2] / results[False][2]
    print(f"packing: {gain:.2f}x real tokens per step, ours {results[True][0] / results[False][0]:.2f}x tokens/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
