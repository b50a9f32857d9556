"""Throughput and peak memory of the filter stage on synthetic teacher output (issue floors in the note).

    .venv/bin/python scripts/bench_filter.py [--rows 100000]

Builds ROWS teacher rows for the support task (2 samples each: correct replies, plus truncated,
echoing, refusing, looping and wrong ones, and repeated rows for dedup), then runs the real stage
twice, each in a fresh process so peak RSS is its own (worker processes reported apart):
  1. rule filters + exact dedup + decontamination (near-dedup off);
  2. near-dedup alone (MinHash LSH on prompts and responses).
Prints rows/s, seconds and peak RSS of each. The stage's own tokenizer and imports are included.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {
    "rules+exact_dedup": ["filter.near_dedup.enabled=false"],
    "near_dedup": ["filter.order=[near_dedup]", "filter.near_dedup.fields=[prompt,response]"],
}


def synthesize(path: Path, rows: int, seed: int = 0) -> None:
    from pipeline.config import load_config
    from pipeline.tasks import task_for

    config = load_config(ROOT / "configs" / "smollm2_support.yaml")
    task = task_for(config)
    examples = task.split("train")
    rng = random.Random(seed)
    fillers = ["Thanks.", "Please help.", "It is urgent.", "Regards.", "Any idea?", "Cheers."]
    greetings = ["Hello!", "Hi there.", "Thanks for writing in.", "Good question."]
    # Made-up words, 8 per ticket and 3 per reply (replies must fit 64 tokens): the tickets come from a
    # few hundred templates, and without these nearly every row would be a near-duplicate, which would
    # spare MinHash LSH its inserts.
    vocabulary = ["".join(rng.choice("bcdfghjklmnprstvz") + rng.choice("aeiou") for _ in range(3)) for _ in range(5000)]

    def details(count: int) -> str:
        return " ".join(rng.sample(vocabulary, count))

    previous_user, previous_replies = "", ("", "")
    with path.open("w") as fh:
        for i in range(rows):
            example = examples[i % len(examples)]
            order = rng.randrange(10**6)
            user = f"{example.user} {rng.choice(fillers)} Order {order}, items {details(8)}."
            # Replies differ from row to row and between the two samples, as real teacher samples do:
            # nothing is cheaper here because texts repeat.
            right = f"{task.reference_answer(example)} (Order {order}: {details(3)}.)"
            reworded = f"{rng.choice(greetings)} {task.reference_answer(example)} Order {order}, {details(3)}."
            if i % 50 == 1:
                user = previous_user  # every 50th row repeats its neighbour's ticket and reply: exact dedup
                example = examples[(i - 1) % len(examples)]
                right, reworded = previous_replies
            previous_user, previous_replies = user, (right, reworded)
            kind = rng.random()
            if kind < 0.1:
                second = {"text": right[: len(right) // 2], "finish_reason": "length"}
            elif kind < 0.2:
                second = {"text": f"{right} {user}", "finish_reason": "stop"}
            elif kind < 0.25:
                second = {"text": "I'm sorry, but I can't help with that.", "finish_reason": "stop"}
            elif kind < 0.3:
                second = {"text": "Thank you. " * 20, "finish_reason": "stop"}
            else:
                second = {"text": reworded, "finish_reason": "stop"}
            row = {
                "prompt_id": f"bench-{i}",
                "category": example.category,
                "user": user,
                "reference": example.reference,
                "messages": [{"role": "user", "content": user}],
                "completions": [
                    {"text": right, "finish_reason": "stop", "output_tokens": 20},
                    {"output_tokens": 20, **second},
                ],
                "teacher": "synthetic",
            }
            fh.write(json.dumps(row) + "\n")


def run_mode(run_dir: Path, overrides: list[str]) -> None:
    """Child process: run the stage once and print JSON with seconds and peak RSS."""
    from pipeline.config import load_config
    from pipeline.filter import run_filter

    config = load_config(
        ROOT / "configs" / "smollm2_support.yaml",
        # Replay off: its answers are the student's generation (an engine start and 155 prompts), not screening.
        [f"runs_dir={run_dir.parent}", f"run_name={run_dir.name}", "tracking.wandb=false", "train.replay.fraction=0"]
        + overrides,
    )
    started = time.perf_counter()
    out = run_filter(config, force=True)
    seconds = time.perf_counter() - started
    report = json.loads((out / "filter_report.json").read_text())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Worker processes (filter.workers > 0) have their own memory: report the largest one too.
    worker_peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_mb": peak_mb,
                "worker_peak_mb": worker_peak_mb,
                "rows": report["prompts_in"],
                "dropped": report["dropped"],
                "workers": report["workers"],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--workers", type=int, nargs="+", default=[None], help="filter.workers values to compare")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        run_mode(Path(args.child[0]), args.child[1:])
        return
    with tempfile.TemporaryDirectory() as tmp:
        from pipeline.layout import RunLayout

        run_dir = Path(tmp) / "bench"
        source = RunLayout(run_dir).teacher_outputs
        source.parent.mkdir(parents=True)
        started = time.perf_counter()
        synthesize(source, args.rows)
        print(
            f"synthesized {args.rows} rows ({source.stat().st_size / 1e6:.0f} MB) "
            f"in {time.perf_counter() - started:.0f} s"
        )
        for mode, workers in ((m, w) for m in args.modes for w in args.workers):
            overrides = [*MODES[mode], f"filter.workers={'null' if workers is None else workers}"]
            result = subprocess.run(
                [sys.executable, __file__, "--child", str(run_dir), *overrides],
                capture_output=True,
                text=True,
                check=True,
            )
            stats = json.loads(result.stdout.strip().splitlines()[-1])
            rate = stats["rows"] / stats["seconds"]
            memory = f"peak RSS {stats['peak_mb']:.0f} MB"
            if stats["workers"]:
                memory += f" + {stats['workers']} workers of up to {stats['worker_peak_mb']:.0f} MB each"
            print(
                f"{mode:18s} workers={stats['workers']} {stats['rows']} rows in {stats['seconds']:.1f} s "
                f"= {rate:,.0f} rows/s, {memory}, dropped {stats['dropped']}"
            )


if __name__ == "__main__":
    main()
