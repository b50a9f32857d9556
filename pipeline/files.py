"""Files of a run: atomic writes (a temporary sibling, renamed when complete), JSONL in and out, and content
hashes. Every file a stage writes goes through here."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from pipeline.console import PipelineError

_decode = msgspec.json.Decoder().decode  # faster than json.loads (docs/measurements.md, "The filter's speed")
_encoder = msgspec.json.Encoder()


def json_line(row: dict[str, Any]) -> str:
    """One JSONL line (UTF-8 kept as is, key order kept): every JSONL file of a run is written with this.

    msgspec encodes a teacher row several times faster than `json.dumps`; like any strict JSON encoder it writes
    a non-finite float as null."""
    return _encoder.encode(row).decode() + "\n"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; it replaces `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    count = 0
    with atomic_path(path) as tmp, tmp.open("w") as fh:
        for row in rows:
            fh.write(json_line(row))
            count += 1
    return count


def parse_json_object(line: str | bytes) -> dict[str, Any]:
    """One JSONL line as a dict; ValueError says what is wrong with it."""
    try:
        row = _decode(line)
    except msgspec.DecodeError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    return row


def read_jsonl(path: Path, on_malformed: Callable[[int, str], None] | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL file. A bad line raises PipelineError naming file and line number, or, with
    `on_malformed`, is reported to it as (line number, message) and skipped."""
    if not path.is_file():
        raise PipelineError(f"input file not found: {path}")
    with path.open() as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = parse_json_object(line)
            except ValueError as exc:
                message = malformed_line_message(path, number, str(exc))
                if on_malformed is None:
                    raise PipelineError(message) from None
                on_malformed(number, message)
                continue
            yield row


def malformed_line_message(path: Path, number: int, problem: str) -> str:
    return f"{path}:{number}: malformed JSON line ({problem})"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(path: Path) -> str:
    """Hash of a file, or of every file under a folder (names and contents)."""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(child.relative_to(path)).encode())
        digest.update(sha256_file(child).encode())
    return digest.hexdigest()
