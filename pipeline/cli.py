"""The `distill` command: one subcommand per stage, `run` for all of them, `status`, `promote`, `compare`, `sweep`,
`key=value` overrides.

Exit codes: 0 done; 2 bad input (one line naming the key, file or column); 3 promotion refused by the
gate; 75 the run directory is locked by another live run (retry later); 130 interrupted, 143 terminated by SIGTERM
(rerun the same command to resume).

distill run --config configs/smollm2_support.yaml
distill train --config configs/smollm2_support.yaml train.learning_rate=1e-4 --force
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from pipeline.config import ConfigError, ExperimentConfig, load_config
from pipeline.console import PipelineError
from pipeline.layout import STAGES
from pipeline.models import BUNDLED, ModelError
from pipeline.promote import PromotionRefused
from pipeline.runs import LockedError, run_lock
from pipeline.tasks import TaskError


def _stage_function(name: str) -> Callable[[ExperimentConfig, bool], Path]:
    if name == "generate":
        from pipeline.generate import run_generate_or_scale_out as fn
    elif name == "filter":
        from pipeline.filter import run_filter as fn
    elif name == "train":
        from pipeline.train import run_train as fn
    elif name == "promote":
        from pipeline.promote import run_promote as fn
    else:
        from pipeline.benchmark import run_benchmark as fn
    return fn


def run_pipeline(config: ExperimentConfig, stages: tuple[str, ...] = STAGES, force: tuple[str, ...] = ()) -> Path:
    """Run stages in order; each skips itself when its inputs and config are unchanged."""
    result = config.run_dir
    for name in stages:
        result = _stage_function(name)(config, name in force)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "run": "all four stages in order",
        "promote": "copy the tuned student to promote.target if it clears the gate",
    }
    for name in (*STAGES, "run", "promote"):
        p = sub.add_parser(name, help=helps.get(name, f"the {name} stage"))
        p.add_argument("--config", required=True, help="experiment YAML (see configs/)")
        p.add_argument(
            "--force",
            action="store_true",
            help={"run": "redo every stage", "promote": "promote even if the gate refuses"}.get(
                name, "redo the stage even if unchanged"
            ),
        )
        if name == "run":
            p.add_argument("--force-stage", action="append", default=[], choices=STAGES, help="redo one stage")
        if name == "generate":
            p.add_argument("--shard", type=int, help="answer only this slice of the prompts (0-based)")
            p.add_argument("--num-shards", type=int, help="how many slices the prompts are split into")
            p.add_argument("--merge-shards", type=int, metavar="N", help="merge N finished shards into one output")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key, e.g. seed=3")
    status = sub.add_parser("status", help="what each stage has done and what a run would redo (runs nothing)")
    status.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    status.add_argument("--json", action="store_true", help="one JSON object per stage: stage, state, detail")
    status.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key, e.g. seed=3")
    sweep = sub.add_parser("sweep", help="train the config's sweep of recipes on one teacher generation; pick one")
    sweep.add_argument("--config", required=True, help="experiment YAML with a sweep: section (see configs/)")
    sweep.add_argument("--report", action="store_true", help="only write the report from the finished trials")
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key, e.g. seed=3")
    compare = sub.add_parser("compare", help="put finished runs side by side (e.g. SFT against KD)")
    compare.add_argument("runs", nargs="+", type=Path, help="run folders, e.g. runs/sft runs/kd")
    mat = sub.add_parser("materialize", help="convert a bundled model to a cached safetensors folder")
    mat.add_argument("model", nargs="?", default="bundled:smollm2-135m-instruct", help=f"one of {', '.join(BUNDLED)}")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's preemption or time limit), raised like Ctrl-C so that every `finally`
    runs: engines close, and vLLM takes its worker processes (and their memory) down with it, instead of
    leaving them orphaned holding the KV cache a rerun needs."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _main(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _how_to_resume(args: argparse.Namespace) -> str:
    """A forced stage starts over each time it is forced: resuming is the same command without --force."""
    if args.command != "promote" and (getattr(args, "force", False) or getattr(args, "force_stage", None)):
        return "rerun the same command without --force/--force-stage to resume"
    return "rerun the same command to resume"


def _main(args: argparse.Namespace) -> int:
    try:
        if args.command == "compare":
            from pipeline.compare import compare_runs

            print(compare_runs(args.runs))
            return 0
        if args.command == "materialize":
            from pipeline.models import resolve_model

            print(resolve_model(args.model))
            return 0
        if args.command == "sweep":
            from pipeline.sweep import SweepPlan, run_sweep, sweep_report

            plan = SweepPlan(args.config, args.overrides)
            if args.report:
                sweep_report(plan)
                print(plan.dir / "report.md")
            else:
                print(run_sweep(plan))
            return 0
        config = load_config(args.config, args.overrides)
        if args.command == "status":
            from pipeline.status import format_status, run_status

            statuses = run_status(config)
            print("\n".join(json.dumps(asdict(s)) for s in statuses) if args.json else format_status(config, statuses))
            return 0
        locked = config.run_dir
        if args.command == "generate" and args.shard is not None and args.num_shards:
            from pipeline.generate import Shard

            # Shards of one run work side by side (a Slurm array): each locks its own folder.
            locked = config.layout.stage_dir(Shard(args.shard, args.num_shards).name)
        if os.environ.get("RANK", "0") != "0":  # a worker rank of `accelerate launch`: rank 0 holds the lock
            if args.command != "train":
                raise PipelineError(f"{args.command}: only train runs under a multi-process launcher")
            return _run_command(args, config)
        with run_lock(locked):
            return _run_command(args, config)
    except LockedError as exc:
        print(f"distill: error: {exc}", file=sys.stderr)
        return 75
    except PromotionRefused as exc:
        print(f"distill: {exc}", file=sys.stderr)
        return 3
    except (ConfigError, TaskError, ModelError, PipelineError) as exc:
        print(f"distill: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"distill: terminated (SIGTERM), engines shut down; {_how_to_resume(args)}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"distill: interrupted; {_how_to_resume(args)}", file=sys.stderr)
        return 130


def _run_command(args: argparse.Namespace, config: ExperimentConfig) -> int:
    if args.command == "run":
        force = STAGES if args.force else tuple(args.force_stage)
        run_pipeline(config, STAGES, force)
        print(f"Report: {config.layout.report_md}\nNumbers: {config.layout.report_json}")
    elif args.command == "generate" and (args.shard is not None or args.num_shards or args.merge_shards):
        from pipeline.generate import Shard, merge_shards, run_generate

        if args.merge_shards:
            print(merge_shards(config, args.merge_shards))
        elif args.shard is None or not args.num_shards:
            raise PipelineError("--shard and --num-shards go together")
        else:
            print(run_generate(config, args.force, Shard(args.shard, args.num_shards)))
    else:
        print(_stage_function(args.command)(config, args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
