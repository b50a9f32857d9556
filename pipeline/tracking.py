"""Weights & Biases logging, offline by default, a no-op when switched off.

Each stage is one W&B run; all stages of a pipeline run share one group (the run name). Each stage's
outputs become an Artifact with the alias `fp-<stage fingerprint>`, linked to the exact upstream version
it was made from: teacher outputs -> dataset -> student -> report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig, resolved_dict
from pipeline.console import log
from pipeline.layout import STAGES, read_manifest


class NoTracker:
    def log(self, data: dict[str, Any]) -> None:
        pass

    def summary(self, data: dict[str, Any]) -> None:
        pass

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        pass

    def artifact(
        self, config: ExperimentConfig, stage: str, fingerprint: str, paths: list[Path], aliases: tuple[str, ...] = ()
    ) -> None:
        pass

    def finish(self) -> None:
        pass


# stage -> (artifact name suffix, W&B artifact type); each stage's artifact derives from its upstream's.
STAGE_ARTIFACTS = {
    "generate": ("teacher-outputs", "dataset"),
    "filter": ("dataset", "dataset"),
    "train": ("student", "model"),
    "benchmark": ("report", "report"),
}
UPSTREAM = dict(zip(STAGES[1:], STAGES[:-1], strict=True))  # filter <- generate, train <- filter, ...


def artifact_name(config: ExperimentConfig, stage: str) -> str:
    return f"{config.run_name}-{STAGE_ARTIFACTS[stage][0]}"


def upstream_artifact(config: ExperimentConfig, stage: str) -> str | None:
    """`name:fp-<fingerprint>` of the exact upstream output this stage read, from the upstream manifest."""
    upstream = UPSTREAM.get(stage)
    manifest = read_manifest(config.layout.stage_dir(upstream)) if upstream else None
    if manifest is None:
        return None
    return f"{artifact_name(config, upstream)}:fp-{manifest['fingerprint']}"


class WandbTracker(NoTracker):
    def __init__(self, run: Any) -> None:
        self.run = run

    def log(self, data: dict[str, Any]) -> None:
        self.run.log(data)

    def summary(self, data: dict[str, Any]) -> None:
        for key, value in data.items():
            self.run.summary[key] = value

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        import wandb

        self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def artifact(
        self, config: ExperimentConfig, stage: str, fingerprint: str, paths: list[Path], aliases: tuple[str, ...] = ()
    ) -> None:
        """Log `paths` as this stage's Artifact, linked to the upstream one. Online, the link is a W&B
        `use_artifact` edge; offline W&B cannot record uses, so the link is kept in the artifact's metadata
        (`derived_from`) and the edge can be added when the runs are synced online. Logging the same files
        again with extra `aliases` (as promote does) adds them to the existing version: W&B versions by content."""
        if not config.tracking.artifacts:
            return
        import wandb

        derived_from = upstream_artifact(config, stage)
        if derived_from and wandb_mode(config) == "online":
            try:
                self.run.use_artifact(derived_from)
            except (wandb.errors.CommError, ValueError) as exc:  # upstream logged offline, never synced
                log(f"tracking: could not link {derived_from} ({exc}); kept in the artifact's metadata")
        kind = STAGE_ARTIFACTS[stage][1]
        metadata = {"stage": stage, "fingerprint": fingerprint, "derived_from": derived_from, "run": config.run_name}
        artifact = wandb.Artifact(artifact_name(config, stage), type=kind, metadata=metadata)
        for path in paths:
            if path.is_dir():
                artifact.add_dir(str(path), name=path.name)
            elif path.is_file():
                artifact.add_file(str(path), name=path.name)
        self.run.log_artifact(artifact, aliases=["latest", f"fp-{fingerprint}", *aliases])

    def finish(self) -> None:
        self.run.finish()


def wandb_mode(config: ExperimentConfig) -> str:
    return config.tracking.mode or os.environ.get("WANDB_MODE") or "offline"


def configure_wandb_env(config: ExperimentConfig, job_type: str) -> str:
    """Set W&B's environment before any `wandb.init` of the process; W&B reads it once, at setup.

    The trainer's own W&B callback sees only the environment, so every stage goes through here.
    """
    mode = wandb_mode(config)
    os.environ["WANDB_MODE"] = mode
    os.environ["WANDB_PROJECT"] = config.tracking.project
    os.environ["WANDB_RUN_GROUP"] = config.run_name
    os.environ["WANDB_JOB_TYPE"] = job_type
    os.environ["WANDB_DIR"] = str(config.run_dir)
    os.environ.setdefault("WANDB_SILENT", "true")
    return mode


def tracking_enabled(config: ExperimentConfig) -> bool:
    return config.tracking.wandb and wandb_mode(config) != "disabled"


def start_tracking(config: ExperimentConfig, stage: str) -> NoTracker:
    """Open a W&B run for `stage`, grouped by the pipeline run; NoTracker when tracking is off."""
    if not tracking_enabled(config):
        return NoTracker()
    return WandbTracker(_init_run(config, stage))


def _init_run(config: ExperimentConfig, stage: str) -> Any:
    """A W&B run for `stage` of this pipeline run: the one already open in this process if there is one (the
    train stage opens its run for TRL's callback, and logs its Artifact into it at the end), else a new one."""
    import wandb

    current = wandb.run
    group = config.tracking.group or config.run_name
    if current is not None and (current.group, current.job_type) == (group, stage):
        return current
    mode = configure_wandb_env(config, stage)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=config.tracking.project,
        group=group,
        job_type=stage,
        name=f"{config.run_name}-{stage}",
        config=resolved_dict(config),
        dir=str(config.run_dir),
        mode=mode,
        reinit="finish_previous",
    )
    return run


def trainer_report_to(config: ExperimentConfig) -> list[str]:
    """What TRL's `report_to` should be. The train stage's W&B run is opened here, with this run's folder
    and group, and the trainer's callback logs into it: left to open its own, the callback would take its
    folder from an environment W&B read once per process (a second run directory in one process, as in
    tests or notebooks, would log into the first one's folder)."""
    if not tracking_enabled(config):
        return []
    if os.environ.get("RANK", "0") != "0":  # under `accelerate launch`, only rank 0 logs
        return []
    _init_run(config, "train")
    return ["wandb"]
