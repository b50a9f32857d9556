"""Multi-process training: real 2-process DDP on CPU (gloo), launched by the Slurm script through
`accelerate launch` with the ready DDP config, as on a GPU node; only the GPUs become CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.config import validate_config
from tests.conftest import tiny_config, write_filtered
from tests.test_train import ROWS

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_ddp_trains_identical_replicas(tmp_path, tiny_model):
    raw = tiny_config(tmp_path, tiny_model)
    raw["train"].update({"max_steps": 5, "per_device_train_batch_size": 2, "device": "cpu"})
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    config = validate_config(raw)
    write_filtered(config, ROWS, ROWS[:2])

    # The Slurm script as Slurm would run it on one node, with stand-ins for `srun` (runs the node's task
    # here, as node 0) and `scontrol` (names this host); `accelerate launch` and DDP are real, gloo on CPU.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nshift  # --kill-on-bad-exit\nSLURM_NODEID=0 exec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    for stand_in in bin_dir.iterdir():
        stand_in.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CONFIG": str(config_file),
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_JOB_NODELIST": "node001",
        "SLURM_NNODES": "1",
        "GPUS_PER_NODE": "2",
        "MASTER_PORT": "29533",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        ["bash", "scripts/slurm/train_multigpu.sbatch", "train.max_steps=3"],  # an override reaches every rank,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((config.run_dir / "train" / "train_metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 3
    digests = metrics["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], "both ranks must hold the same adapter weights"
    # 3 steps x 2 ranks x batch 2 = 12 examples seen: the data was split across ranks, not duplicated.
    assert metrics["log_history"][-1]["epoch"] == pytest.approx(1.5)
    assert (config.run_dir / "train" / "adapter" / "adapter_model.safetensors").is_file()
    assert (config.run_dir / "train" / "merged" / "config.json").is_file()
    assert not (config.run_dir / ".lock").exists()


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero3"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert loaded.distributed_type.value == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero3": "DEEPSPEED"}[name]
    assert loaded.num_processes >= 2 and not loaded.use_cpu
