"""What a sweep runs: its folder, its trials (combinations of the knobs' values, cheap or in full), and each
trial's run directory and config.

    <runs_dir>/<sweep name>/
        study.db                      the Optuna study (unless sweep.storage names a database server)
        shared/generate-<fingerprint> one teacher generation, linked into every trial
        shared/filter-<fingerprint>   one per filter setting: a train knob reuses it, a filter knob makes another
        shared/benchmark/             the teacher's and the untuned student's figures, measured by the first trial
        trials/<trial>/               a normal run directory: `distill status`, `compare` and `promote` work on it
        report.md, report.json, pareto.png
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, ExperimentConfig, SweepConfig, load_raw, validate_config, with_overrides

CHEAP_PREFIX = "cheap-"


@dataclass(frozen=True)
class Trial:
    """One recipe: the knobs' values, at the cheap fidelity (successive halving's first rung) or in full."""

    knobs: dict[str, Any]
    cheap: bool = False

    @property
    def key(self) -> str:
        """The trial's folder name: readable knob values and a digest of them (`learning_rate=0.001-3fa2c1`)."""
        words = ",".join(f"{name.rsplit('.', 1)[-1]}={_short(value)}" for name, value in self.knobs.items())
        words = re.sub(r"[^A-Za-z0-9.=,_+-]", "_", words)[:80]
        digest = hashlib.sha256(json.dumps(self.knobs, sort_keys=True, default=str).encode()).hexdigest()[:6]
        return f"{CHEAP_PREFIX if self.cheap else ''}{words}-{digest}"

    def described(self) -> str:
        return ", ".join(f"{name}={_short(value)}" for name, value in self.knobs.items())


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


class SweepPlan:
    """A sweep read from an experiment YAML's `sweep:` section, with every trial's config validated up front, so
    a bad knob or value stops the sweep before anything runs, in one line naming it."""

    def __init__(self, config_path: str | Path, overrides: list[str] | None = None) -> None:
        self.config_path = Path(config_path)
        self.overrides = list(overrides or [])
        self.raw = load_raw(self.config_path, self.overrides)
        self.config = validate_config(self.raw)
        if self.config.sweep is None:
            raise ConfigError("sweep: this config has no sweep section; add one naming the knobs and their values")
        self.sweep: SweepConfig = self.config.sweep
        self.name = self.sweep.name or f"{self.config.run_name}-sweep"
        self.dir = self.config.run_dir.parent / self.name
        for section, keys in (("halving.cheap", self.sweep.halving.cheap), ("fixed", self.sweep.fixed)):
            both = sorted(set(self.sweep.knobs) & set(keys))
            if both:
                raise ConfigError(f"sweep.{section}.{both[0]}: also a knob; it cannot also set what is swept")
        self.points = self._points()
        for trial in self.trials(cheap=False) + (self.trials(cheap=True) if self.halving else []):
            self.trial_config(trial)  # raises on a bad value, naming the knob

    @property
    def halving(self) -> bool:
        return self.sweep.search == "halving"

    def _points(self) -> list[dict[str, Any]]:
        names = list(self.sweep.knobs)
        grid = [dict(zip(names, values, strict=True)) for values in itertools.product(*self.sweep.knobs.values())]
        if self.sweep.search == "random" and self.sweep.trials is not None and self.sweep.trials < len(grid):
            chosen = sorted(random.Random(self.config.seed).sample(range(len(grid)), self.sweep.trials))
            grid = [grid[i] for i in chosen]
        return grid

    def trials(self, cheap: bool) -> list[Trial]:
        return [Trial(point, cheap) for point in self.points]

    @property
    def trials_dir(self) -> Path:
        return self.dir / "trials"

    @property
    def shared_dir(self) -> Path:
        return self.dir / "shared"

    @property
    def storage_url(self) -> str:
        return self.sweep.storage or f"sqlite:///{self.dir / 'study.db'}"

    def study_name(self, cheap: bool) -> str:
        """One study per search (the trials' folders are shared: a halving after a grid reuses its full trials)."""
        name = self.name if self.sweep.search == "grid" else f"{self.name}-{self.sweep.search}"
        return f"{name}-cheap" if cheap else name

    def trial_overrides(self, trial: Trial) -> dict[str, Any]:
        """Every key the trial sets on the experiment: its folder, its W&B group, the sweep's fixed settings, the
        cheap rung's, its knobs."""
        placed = {
            "runs_dir": str(self.trials_dir),
            "run_name": trial.key,
            "tracking.group": self.name,
            "benchmark.shared_units": str(self.shared_dir / "benchmark"),  # the untuned systems measured once
        }
        return placed | self.sweep.fixed | (self.sweep.halving.cheap if trial.cheap else {}) | trial.knobs

    def trial_config(self, trial: Trial) -> ExperimentConfig:
        try:
            return validate_config(with_overrides(self.raw, self.trial_overrides(trial)))
        except ConfigError as exc:
            raise ConfigError(f"sweep trial {trial.described()}: {exc}") from None

    def command(self, verb: str, trial: Trial) -> str:
        """The `distill` command line that acts on one trial (`distill promote ...` for the pick)."""
        sets = {k: v for k, v in self.trial_overrides(trial).items() if k != "tracking.group"}
        words = [f"{key}={_yaml_scalar(value)}" for key, value in sets.items()]
        return " ".join(["distill", verb, "--config", str(self.config_path), *self.overrides, *words])


def _yaml_scalar(value: Any) -> str:
    """A value as a `key=value` override reads it back (YAML), quoted for the shell where it must be."""
    text = json.dumps(value) if isinstance(value, list | dict | bool) or value is None else str(value)
    return f"'{text}'" if re.search(r"[\s\[\]{}\"']", text) else text
