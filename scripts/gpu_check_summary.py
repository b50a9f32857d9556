"""The summary at the end of scripts/gpu_check.sh, from what its steps left in its output folder: the benches'
table, the train stage's GPU floors met or missed, the rules of the Liger and fused-head defaults against the
options measured beside them, and the whole pipeline's train figures and benchmark hardware.

    python scripts/gpu_check_summary.py OUT_DIR BENCH...    # BENCH: the benches' names, in the table's order

A bench that did not run or finish has no `<name>.json` and gets a row that says so; nothing here fails on a
missing figure, so a check cut short still prints what it has."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# The train stage's floors on a GPU: ours >= 0.9 of the plain loop, unpacked and packed; packed MFU >= 10% on the
# 0.5B shape and >= 20% on the 1.5B one.
MIN_RATIO = 0.9
PACKED_MFU_FLOORS = (("bench_05b", 0.10), ("bench_15b", 0.20))
# The defaults' rules, each against its option measured in the same check: (default bench, option bench, batches,
# what, the default's rule).
RULES = (
    ("bench_15b", "liger_unpacked", "unpacked", "Liger, 1.5B unpacked", "off unpacked"),
    ("bench_05b", "fused_head", "packed", "fused LM head, 0.5B packed", "off by size"),
)
MODES = ("unpacked", "packed")


def figures(out: Path, name: str) -> dict[str, Any]:
    """A bench's JSON (scripts/bench_train.py --json), {} where it did not run or finish."""
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def bench_table(out: Path, names: list[str]) -> list[str]:
    lines = [
        "medians of the rounds (plain, ours, plain, ours...); ours/plain with the rounds' range",
        "",
        "| model | packing | ours tok/s | plain tok/s | ours/plain | MFU ours | MFU plain | attention, head, Liger "
        "| peak GiB ours/plain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        data = figures(out, name)
        if not data:
            lines.append(f"| {name} | (no result: {name}.log, if it ran) |")
            continue
        for mode in MODES:
            r = data.get(mode)
            if not r:
                continue
            mem = r["peak_memory_gib"]
            memory = f"{mem['ours']:.1f} / {mem['plain']:.1f}" if mem["ours"] is not None else "-"
            label = Path(data["model"]).name + ("" if name.startswith("bench") else f" ({name})")
            turns = r.get("round_ratios", [r["ratio"]])
            spread = f" ({min(turns):.2f}-{max(turns):.2f})" if len(turns) > 1 else ""
            kernels = r["attention"] + (", fused head" if r.get("fused_lm_head") else "")
            kernels += ", Liger" if r.get("liger_kernels") else ""
            lines.append(
                f"| {label} | {mode} | {r['ours_tok_s']:,.0f} | {r['plain_tok_s']:,.0f} | {r['ratio']:.2f}{spread} | "
                f"{r.get('mfu') or 0:.1%} | {r.get('plain_mfu') or 0:.1%} | {kernels} | {memory} |"
            )
    return lines


def floors(out: Path) -> list[str]:
    lines = []
    for name, packed_mfu in PACKED_MFU_FLOORS:
        data = figures(out, name)
        for mode in MODES:
            r = data.get(mode)
            if r is None:
                lines.append(f"{name} {mode}: no figures")
                continue
            met = "met" if r["ratio"] >= MIN_RATIO else "MISSED"
            lines.append(f"{name} {mode}: ours/plain {r['ratio']:.2f} {met} (>= {MIN_RATIO})")
            if mode == "packed":
                mfu = r.get("mfu") or 0
                met = "met" if mfu >= packed_mfu else "MISSED"
                lines.append(f"{name} packed: MFU {mfu:.1%} {met} (>= {packed_mfu:.0%})")
    return lines


def rules(out: Path) -> list[str]:
    """Ratios, not tok/s: each side of a pair has its own plain loop, whose speed moves between benches."""
    lines = []
    for default, option, mode, what, rule in RULES:
        a, b = figures(out, default).get(mode), figures(out, option).get(mode)
        if a and b:
            verdict = "holds" if a["ratio"] >= b["ratio"] else "NOT borne out"
            lines.append(f"{what}: {b['ratio']:.2f} with, {a['ratio']:.2f} without (default: {rule}): {verdict}")
    return lines


def whole_pipeline(out: Path) -> list[str]:
    """The train stage's figures and the benchmark's hardware and distances to its limits, from the run under
    `out/runs/`."""
    lines = []
    metrics = next((out / "runs").glob("*/train/train_metrics.json"), None)
    if metrics:
        m = json.loads(metrics.read_text())
        lines.append(
            f"whole pipeline, QLoRA train stage: {m['steps']} steps, {m.get('train_tokens_per_s')} tok/s, "
            f"MFU {m.get('mfu')}, on {m.get('accelerator')}; bf16 {m.get('bf16')}, fused LM head "
            f"{m.get('fused_lm_head')}, Liger {m.get('liger_kernels')}"
        )
    report = next((out / "runs").glob("*/benchmark/report.json"), None)
    if report:
        r = json.loads(report.read_text())
        hw = r["hardware"]
        lines.append(
            f"benchmark on {hw['device']} x{hw['count']}: profile {hw['serving_hardware']} ({hw['serving_source']}), "
            f"{hw['profiles'][hw['serving_hardware']]}"
        )
        for name, s in r["systems"].items():
            lines.append(
                f"  {name}: decode {s.get('decode_tokens_per_s', 0):.1f} of "
                f"{s.get('decode_ceiling_tokens_per_s', 0):,.0f} tok/s = {s.get('decode_roofline_share', 0):.2%} of "
                f"the roofline ({s.get('decode_basis')}), batched {s.get('batched_compute_share', 0):.3%} of peak, "
                f"${s.get('cost_per_1k_requests', 0):.4f}/1k, p50 one at a time warm {s.get('latency_p50_s', 0):.2f} "
                f"/ cold {s.get('latency_cold_p50_s', 0):.2f} s"
            )
    return lines


def summary(out: Path, names: list[str]) -> str:
    parts = ["\n".join(bench_table(out, names)), "floors:\n  " + "\n  ".join(floors(out))]
    if found := rules(out):
        parts.append("rules:\n  " + "\n  ".join(found))
    if found := whole_pipeline(out):
        parts.append("\n".join(found))
    return "\n\n".join(parts)


if __name__ == "__main__":
    print("\n" + summary(Path(sys.argv[1]), sys.argv[2:]))
