"""Teacher accuracy on a label task with and without constrained decoding, side by side in one run.

    .venv/bin/python scripts/bench_constrained.py                      # sentiment example + 30-label set
    .venv/bin/python scripts/bench_constrained.py --backend transformers --limit 40

For each data set the teacher (the config's model, full prompt, greedy) answers the train split, the prompts
the generate stage would give it, twice on one engine: free (`task.params.constrained=false`) and constrained
to the label set. Printed per run: accuracy with its 95% Wilson interval, invalid labels, answers cut at
max_tokens, and output tokens. The many-label set is synthetic: 30 categories of 5 everyday items each,
written here (not taken from a data set), asked as "Item: <word>".
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "mango", "pear"],
    "vegetable": ["carrot", "potato", "spinach", "onion", "cabbage"],
    "mammal": ["dog", "horse", "whale", "elephant", "rabbit"],
    "bird": ["eagle", "sparrow", "penguin", "parrot", "owl"],
    "fish": ["salmon", "tuna", "trout", "cod", "shark"],
    "insect": ["ant", "bee", "beetle", "mosquito", "butterfly"],
    "color": ["red", "blue", "green", "purple", "yellow"],
    "vehicle": ["car", "bus", "bicycle", "truck", "motorcycle"],
    "instrument": ["violin", "piano", "trumpet", "guitar", "flute"],
    "sport": ["football", "tennis", "golf", "basketball", "hockey"],
    "country": ["France", "Japan", "Brazil", "Canada", "Egypt"],
    "city": ["Paris", "Tokyo", "London", "Chicago", "Madrid"],
    "planet": ["Mars", "Venus", "Jupiter", "Saturn", "Mercury"],
    "metal": ["iron", "copper", "gold", "silver", "aluminium"],
    "gemstone": ["ruby", "diamond", "emerald", "sapphire", "opal"],
    "tool": ["hammer", "screwdriver", "wrench", "saw", "drill"],
    "furniture": ["chair", "table", "sofa", "wardrobe", "bed"],
    "clothing": ["shirt", "jacket", "trousers", "sock", "dress"],
    "drink": ["coffee", "tea", "juice", "lemonade", "milk"],
    "dessert": ["cake", "pudding", "ice cream", "pie", "brownie"],
    "weather": ["rain", "snow", "fog", "hail", "thunder"],
    "emotion": ["joy", "anger", "fear", "sadness", "surprise"],
    "profession": ["doctor", "teacher", "plumber", "lawyer", "baker"],
    "body part": ["hand", "knee", "elbow", "shoulder", "ankle"],
    "language": ["Spanish", "German", "Mandarin", "Arabic", "Hindi"],
    "shape": ["circle", "square", "triangle", "hexagon", "oval"],
    "flower": ["rose", "tulip", "daisy", "lily", "orchid"],
    "tree": ["oak", "pine", "maple", "birch", "willow"],
    "currency": ["dollar", "euro", "yen", "rupee", "peso"],
    "month": ["January", "March", "July", "October", "December"],
}


def many_label_csv(folder: Path) -> Path:
    path = folder / "categories.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for label, items in CATEGORIES.items():
            writer.writerows([f"Item: {item}", label] for item in items)
    return path


def measure(engine, task_params: dict, name: str, config, limit: int | None) -> list[dict]:
    from pipeline.benchmark.stats import wilson_interval
    from pipeline.tasks import build_task

    rows = []
    for constrained in (False, True):
        task = build_task("classification", {**task_params, "constrained": constrained}, config.seed, config.base_dir)
        examples = task.split("train")[:limit]
        sampling = config.teacher.sampling.model_copy(update={"n": 1, "temperature": 0.0, "seed": None})
        sampling = sampling.constrained_to(task.answer_choices())
        conversations = [task.messages(ex, config.teacher.prompt_style) for ex in examples]
        started = time.perf_counter()
        generations = engine.generate(conversations, sampling, progress=False)
        seconds = time.perf_counter() - started
        completions = [g.completions[0] for g in generations]
        pairs = list(zip(completions, examples, strict=True))
        correct = sum(task.score(c.text, ex)["label"] for c, ex in pairs)
        invalid = sum(task.failure_modes(c.text, ex)["invalid_label"] for c, ex in pairs)
        n = len(examples)
        rows.append(
            {
                "data": name,
                "labels": len(task.labels()),
                "constrained": constrained,
                "n": n,
                "accuracy": correct / n,
                "accuracy_ci95": wilson_interval(correct, n),
                "invalid_labels": invalid / n,
                "truncated": sum(c.finish_reason == "length" for c in completions) / n,
                "output_tokens": sum(c.output_tokens or 0 for c in completions),
                "seconds": round(seconds, 1),
                "first_answers": [c.text for c in completions[:3]],
                "most_common_answer": Counter(c.text.strip() for c in completions).most_common(1)[0],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/smollm2_sentiment.yaml"))
    parser.add_argument("--backend", choices=["vllm", "transformers"], default=None, help="default: the config's")
    parser.add_argument("--limit", type=int, default=None, help="at most this many prompts per data set")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    from pipeline.config import load_config
    from pipeline.engines import load_engine, model_for

    config = load_config(Path(args.config))
    engine_config = config.teacher.engine
    if args.backend:
        engine_config = engine_config.model_copy(update={"backend": args.backend})
    engine = load_engine(model_for(config.teacher.model, engine_config), engine_config, config.seed)
    sentiment = dict(config.task.params)
    with tempfile.TemporaryDirectory() as folder:
        many = {"path": str(many_label_csv(Path(folder))), "test_fraction": 0.25, "few_shot": 8}
        try:
            rows = measure(engine, sentiment, "sentiment example", config, args.limit)
            rows += measure(engine, many, "synthetic 30 labels", config, args.limit)
        finally:
            engine.close()
    print(f"\nteacher {config.teacher.model}, {config.teacher.prompt_style} prompt, greedy, {engine_config.backend}")
    print("| data | labels | decoding | n | accuracy [95% CI] | invalid labels | cut at max_tokens | out tok | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        low, high = r["accuracy_ci95"]
        print(
            f"| {r['data']} | {r['labels']} | {'constrained' if r['constrained'] else 'free'} | {r['n']} "
            f"| {r['accuracy']:.3f} [{low:.2f}, {high:.2f}] | {r['invalid_labels']:.1%} | {r['truncated']:.1%} "
            f"| {r['output_tokens']} | {r['seconds']} |"
        )
    for r in rows:
        text, count = r["most_common_answer"]
        print(
            f"{r['data']}, {'constrained' if r['constrained'] else 'free'}: first answers {r['first_answers']}; "
            f"most common {text!r} ({count} of {r['n']})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
