"""Our train stage against a plain PyTorch + PEFT loop, side by side in one process, on the same batches.

    .venv/bin/python scripts/bench_train.py [--config configs/smollm2_support.yaml] [--steps 8] [KEY=VALUE ...]

Both train the config's student with the same LoRA settings, learning rate, precision and batches:
- "plain": the model and LoRA adapter through `peft.get_peft_model` (frozen weights in bf16 and the adapter in fp32
  under bf16 autocast when our stage trains in bf16, fp32 otherwise), AdamW, and a loop of forward, backward,
  optimizer step over the batches the trainer's dataloader yields, moved to the device (run first);
- "ours": `build_trainer` (TRL SFTTrainer, as the train stage builds it) and `trainer.train()`.
The first `--warmup` steps of each are not timed (CUDA context, kernel selection); the clock stops at the last
step's end (ours' final checkpoint save excluded). Throughput is real (non-padding) training tokens per second;
the ratio ours / plain is printed. With `--rounds N` the two sides take turns N times over the same batches
(plain, ours, plain, ours...; each keeps its model and optimizer, so both models stay resident and each peak GPU
memory figure includes the other's weights) and the medians are printed, with each round's ratio: on an H200 the
plain loop's own speed moved 15% between runs minutes apart, more than the margin a one-window ratio is judged by.
The plain loop runs transformers' own model code: the Liger kernels that building our trainer patches into the
model's module (the stage's CUDA default) are set aside while it runs, as the stage sets them aside once it has
trained. Then the same with `train.packing=true`: padding-free rows, passed to the plain loop as the model needs
them (position ids and the examples' boundaries, no mask). On CUDA the model FLOPs utilisation is printed against
the device's datasheet peak (pipeline/hardware.py), or `--peak-tflops`.
With `--host-bound`, the student is a random-weight stand-in with its tokenizer and the depth of a 1.5B student
(28 layers, LoRA on every linear layer) but 32 wide, at batch 1: its steps cost little arithmetic, so the host's work
per step (Python, operator dispatch, the trainer's bookkeeping) bounds them on a CPU, as it bounds an unpacked step of
short examples on a GPU (~170-220 ms a step on an H200, where the GPU's share is small).
Data: the run's `filter/train.jsonl` if it exists, else the task's train prompts with canned replies.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def training_rows(config, limit: int) -> list[dict]:
    from pipeline.files import read_jsonl
    from pipeline.tasks import task_for
    from pipeline.train.data import to_prompt_completion

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


def host_bound_model(student: str, out: Path) -> str:
    """The `--host-bound` stand-in: Qwen2.5-1.5B's depth and attention layout (28 layers, 12 heads to 2 KV heads
    there; 2 to 1 here) at hidden size 32, random weights, the student's tokenizer and vocabulary."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipeline.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(student))
    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=28,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def real_tokens(batch) -> int:
    """Non-padding tokens: the attention mask's ones, or the flat row's length when padding-free."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_clock(first: int, last: int):
    """A trainer callback that stamps the end of steps `first` and `last`, after a device sync there only: a sync
    at every step would stall the CPU the way the stage no longer does (pipeline/train/stage_trainer.TokenCounter)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: dict[int, float] = {}

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (first, last):
                synchronize()
                self.stamps[state.global_step] = time.perf_counter()

    return Clock()


def ours(trainer, tokens: list[int], warmup: int) -> tuple[int, float]:
    """`trainer.train()` as the stage runs it, timed from the end of step `warmup` to the end of the last step."""
    clock = step_clock(warmup, len(tokens))
    trainer.add_callback(clock)
    try:
        trainer.train()
    finally:
        trainer.remove_callback(clock)
    return sum(tokens[warmup:]), clock.stamps[len(tokens)] - clock.stamps[warmup]


@contextmanager
def stock_code(module, stock: dict):
    """The model's module with transformers' own attributes (`stock`, read before our trainer was built) while the
    plain loop builds and runs its model; the patched ones (Liger's, if any) back afterwards, for ours."""
    from pipeline.train.options import module_restored

    with module_restored(module):
        if module is not None:
            for name, value in stock.items():
                setattr(module, name, value)
        yield


def plain_loop(config, model_path: str, device, bf16: bool, attention: str):
    """The loop a user would write by hand: PEFT model, AdamW, forward/backward/step; with the stage's attention
    kernels (no cuDNN attention on CUDA), so that the ratio compares the loops, not the kernels. Returns a function
    that runs it over a list of batches and times it after `warmup` steps; it keeps one model and optimizer across
    calls. It ran before ours in one window: with cuDNN attention it used to plan every padded length that ours
    then found planned, and the unpacked ratios on an H200 read 1.6-2.3 (three runs, 0.4B and 1.4B shapes) where
    the loops, on equal kernels, were at 0.89 and 1.16."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.hardware import attention_without_cudnn

    lora = config.train.lora
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attention).to(device)
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
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def run(batches, warmup: int) -> tuple[int, float]:
        started = 0.0
        with attention_without_cudnn(device.type):
            for step, batch in enumerate(batches):
                if step == warmup:
                    synchronize()
                    started = time.perf_counter()
                inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
                with autocast:
                    loss = model(**inputs).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            synchronize()
        return sum(real_tokens(b) for b in batches[warmup:]), time.perf_counter() - started

    return run


def profile_steps(trainer, steps: int = 2) -> None:
    """torch.profiler over a few of our steps: the operators that took the time, device time first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    trainer.args.max_steps = steps
    with profile(activities=activities) as prof:
        trainer.train()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))


def sync_sites(trainer, steps: int = 3) -> None:
    """The lines that made the CPU wait for the GPU during `steps` of our steps (CUDA's sync debug mode), with their
    count: a line counted once per step stalls every step."""
    import collections
    import warnings

    import torch

    trainer.args.max_steps = steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = collections.Counter(
        f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}"
        for w in caught
        if "synchroniz" in str(w.message)
    )
    total = sum(sites.values())
    print(f"host-device syncs in {steps} steps of ours (train()'s setup and final checkpoint save included): {total}")
    for site, count in sites.most_common(12):
        print(f"  {count:4d}  {site}")


def measure(args, base: list[str], rows, packing: bool, peak: float | None) -> dict:
    """One side-by-side measurement, unpacked or packed, in `args.rounds` turns; prints its lines and returns the
    figures (medians over the rounds, and each round's)."""
    import statistics

    import torch

    from pipeline.config import load_config
    from pipeline.hardware import mfu
    from pipeline.models import resolve_model
    from pipeline.train.options import attention_implementation, model_family_module, module_restored, speed_options
    from pipeline.train.stage_trainer import model_parameters
    from pipeline.train.trainer import build_trainer

    count = (args.packed_steps or args.steps) if packing else args.steps
    overrides = [*base, f"train.packing={str(packing).lower()}", f"train.max_steps={count}"]
    config = load_config(args.config, [*overrides, f"train.logging_steps={count}"])
    model_path = resolve_model(config.student.model)
    module = model_family_module(model_path)
    stock = dict(vars(module)) if module is not None else {}
    cuda = torch.cuda.is_available()
    rounds = []  # (ours tokens, ours seconds, plain tokens, plain seconds)
    plain_memory = memory = None
    # Ours' Liger patches, applied as the trainer is built, end with the measurement (as the stage's do).
    with module_restored(module), tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(config, model_path, rows, [], Path(tmp) / "out")
        batches = list(itertools.islice(trainer.get_train_dataloader(), count))
        batch_tokens = [real_tokens(b) for b in batches]
        device, bf16 = trainer.args.device, trainer.args.bf16
        attention = attention_implementation(config.train)
        with stock_code(module, stock):
            plain = plain_loop(config, model_path, device, bf16, attention)
        for _ in range(args.rounds):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            with stock_code(module, stock):
                plain_tokens, plain_seconds = plain(batches, args.warmup)
            if cuda:
                plain_memory = max(plain_memory or 0, torch.cuda.max_memory_allocated() / 2**30)
                torch.cuda.reset_peak_memory_stats()
            rounds.append((*ours(trainer, batch_tokens, args.warmup), plain_tokens, plain_seconds))
            if cuda:
                memory = max(memory or 0, torch.cuda.max_memory_allocated() / 2**30)
        if args.profile and not packing:
            profile_steps(trainer)
        if args.profile and packing and cuda:
            sync_sites(trainer)
    ratios = [(t / s) / (pt / ps) for t, s, pt, ps in rounds]
    name = "packed  " if packing else "unpacked"
    timed = count - args.warmup
    result = {
        "packing": packing,
        "ours_tok_s": statistics.median(t / s for t, s, _, _ in rounds),
        "plain_tok_s": statistics.median(pt / ps for _, _, pt, ps in rounds),
        "tokens_per_step": sum(batch_tokens[args.warmup :]) / timed,
        "ratio": statistics.median(ratios),
        "round_ratios": ratios,
        "attention": attention,
        **speed_options(trainer),
        "peak_memory_gib": {"ours": memory, "plain": plain_memory},
    }
    for k, (t, s, pt, ps) in enumerate(rounds):
        turn = f" (round {k + 1} of {len(rounds)})" if len(rounds) > 1 else ""
        print(
            f"{name} ours : {t} real tokens in {s:.2f} s = {t / s:.0f} tok/s "
            f"({t / timed:.0f} real tokens/step, {timed} timed steps; attention {attention}, bf16 {bf16}, "
            f"fused LM head {result['fused_lm_head']}, Liger {result['liger_kernels']}){turn}"
        )
        print(f"{name} plain: {pt} real tokens in {ps:.2f} s = {pt / ps:.0f} tok/s{turn}")
    if memory is not None:
        print(f"{name} peak GPU memory: ours {memory:.1f} GiB, plain {plain_memory:.1f} GiB")
    spread = f" (median of {len(ratios)} rounds: {', '.join(f'{r:.3f}' for r in ratios)})" if len(ratios) > 1 else ""
    print(f"{name} ratio ours/plain = {result['ratio']:.3f}{spread}")
    if peak:
        full = config.train.method == "full"
        result["mfu"] = mfu(result["ours_tok_s"], model_parameters(trainer.model), full, peak)
        result["plain_mfu"] = mfu(result["plain_tok_s"], model_parameters(trainer.model), full, peak)
        print(
            f"{name} model FLOPs utilisation: {result['mfu']:.1%} of {peak:g} TFLOP/s (plain {result['plain_mfu']:.1%})"
        )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2_support.yaml"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--packed-steps", type=int, default=None, help="steps for the packed run (default --steps)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps of each side (at least 1)")
    parser.add_argument("--rounds", type=int, default=1, help="turns of plain then ours; medians are reported")
    parser.add_argument("--peak-tflops", type=float, help="the accelerator's peak (default: its datasheet on CUDA)")
    parser.add_argument("--only", choices=("unpacked", "packed"), help="measure one of the two")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="torch.profiler table of two of our unpacked steps; on CUDA, the lines that sync in three packed steps",
    )
    parser.add_argument(
        "--host-bound",
        action="store_true",
        help="a 28-layer, 32-wide stand-in for the student at batch 1: the host bounds its steps, as on a GPU unpacked",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps <= args.warmup or (args.packed_steps or args.steps) <= args.warmup:
        parser.error("--warmup must be at least 1, and --steps and --packed-steps must exceed it")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    from pipeline.config import load_config
    from pipeline.files import write_json
    from pipeline.hardware import cuda_accelerator

    base = [*args.overrides, "tracking.wandb=false", "train.save_steps=100000"]
    config = load_config(args.config, base)
    stand_in = tempfile.TemporaryDirectory() if args.host_bound else None
    if stand_in:
        stand_in_path = host_bound_model(config.student.model, Path(stand_in.name))
        base += [f"student.model={stand_in_path}", "train.per_device_train_batch_size=1"]
        config = load_config(args.config, base)
    model_name = "host-bound stand-in" if args.host_bound else config.student.model
    cuda = cuda_accelerator()
    peak = args.peak_tflops or (cuda[1].peak_tflops if cuda and cuda[1] else None)
    print(f"device: {cuda[0] if cuda else 'cpu'}; model {model_name}")
    batch = config.train.per_device_train_batch_size * config.train.gradient_accumulation_steps
    steps = max(args.steps, args.packed_steps or 0)
    rows = training_rows(config, steps * batch * 16)  # enough for the packed steps

    results = {}
    for mode in ("unpacked", "packed"):
        if args.only in (None, mode):
            results[mode] = measure(args, base, rows, mode == "packed", peak)
            if args.json:  # after each mode: a run cut off by a time limit (scripts/gpu_check.sh) keeps what finished
                summary = {"device": cuda[0] if cuda else "cpu", "model": model_name, **results}
                write_json(args.json, summary)  # atomic: a kill mid-write leaves the previous mode's figures
    if len(results) == 2:
        gain = results["packed"]["tokens_per_step"] / results["unpacked"]["tokens_per_step"]
        speed = results["packed"]["ours_tok_s"] / results["unpacked"]["ours_tok_s"]
        print(f"packing: {gain:.2f}x real tokens per step, ours {speed:.2f}x tokens/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
