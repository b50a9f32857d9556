"""What the pipeline tells its user on stderr: a progress line (`log`), or the one-line error a stage stops with
(`PipelineError`). Every module may import this one; it imports nothing of the pipeline's."""

from __future__ import annotations

import json
import os
import sys
import time


class PipelineError(RuntimeError):
    """A stage cannot run with the inputs it was given; the message is shown as-is."""


def log(message: str) -> None:
    """One progress line on stderr; with DISTILL_LOG_FORMAT=json, one JSON object per line for log systems."""
    if os.environ.get("DISTILL_LOG_FORMAT") == "json":
        stage = message.split(":", 1)[0] if ":" in message[:20] else None
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(), "stage": stage, "message": message}
        print(json.dumps(record), file=sys.stderr, flush=True)
    else:
        print(f"[distill] {message}", file=sys.stderr, flush=True)
