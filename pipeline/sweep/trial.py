"""One trial of a sweep: the four stages in the trial's own run directory, with the stages upstream of what it
changes shared between trials. A trial's `generate` and `filter` folders are links to `shared/<stage>-<fingerprint>`:
the fingerprint covers the config the stage reads and its inputs, so trials that agree on them share one folder,
and the stage runs there once (a second worker waits for the first to finish it, then skips it as fresh)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from pipeline.config import ExperimentConfig
from pipeline.console import log
from pipeline.runs import LockedError, Stage, run_lock
from pipeline.tasks import Task, task_for


def _shared_stages() -> list[tuple[str, Callable[[ExperimentConfig, Task], Stage], Callable[..., Path]]]:
    from pipeline.filter import run_filter
    from pipeline.filter.stage import filter_stage
    from pipeline.generate import run_generate_or_scale_out
    from pipeline.generate.stage import generate_stage

    return [("generate", generate_stage, run_generate_or_scale_out), ("filter", filter_stage, run_filter)]


def run_trial(config: ExperimentConfig) -> Path:
    """Run a trial's stages, each skipped when fresh; the shared ones in `<sweep>/shared`. Returns report.json."""
    from pipeline.benchmark import run_benchmark
    from pipeline.train import run_train

    shared = config.run_dir.parent.parent / "shared"
    task = task_for(config)
    with run_lock(config.run_dir):
        for name, stage_of, run in _shared_stages():
            # Computed once the stage before it is done: the filter's fingerprint hashes the teacher's outputs.
            target = shared / f"{name}-{stage_of(config, task).fingerprint}"
            link_stage(config.layout.stage_dir(name), target)
            with waiting_lock(target):
                run(config, False)
        run_train(config, False)
        return run_benchmark(config, False)


def link_stage(link: Path, target: Path) -> None:
    """Point a trial's stage folder at the shared one (a relative link: the sweep's folder may move)."""
    target.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(target, link.parent)
    if link.is_symlink():
        if os.readlink(link) == relative:
            return
        link.unlink()  # the trial's settings changed since it last ran: another shared folder now
    elif link.exists():
        return  # a folder of its own (the trial ran outside a sweep): it stays the trial's
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(relative, target_is_directory=True)


@contextmanager
def waiting_lock(directory: Path, poll_s: float = 2.0) -> Iterator[None]:
    """Hold `directory`'s run lock, waiting while another worker holds it (it is making the same shared stage)."""
    waited = False
    with ExitStack() as stack:
        while True:
            try:
                stack.enter_context(run_lock(directory))
                break
            except LockedError:
                if not waited:
                    log(f"sweep: another worker is making {directory.name}; waiting for it")
                    waited = True
                time.sleep(poll_s)
        yield
