"""Experiment config: one YAML per experiment, validated on load, with `key=value` overrides.

One module per top-level key of the YAML: `engine.py` (the `engine` and `sampling` sections teacher, benchmark and
the judges share), `filter.py`, `train.py`, `benchmark.py` (with `benchmark.verdict` and `promote`), and
`experiment.py`, the root with `teacher`, `student`, `task`, `tracking`, loading and overrides.
"""

from pipeline.config.base import ConfigError
from pipeline.config.benchmark import (
    BenchmarkConfig,
    BenchmarkJudgeConfig,
    HardwareConfig,
    LmEvalConfig,
    LoadTestConfig,
    PromoteConfig,
    SystemConfig,
    VerdictConfig,
)
from pipeline.config.engine import HOW_A_SERVER_IS_ASKED, EngineConfig, SamplingConfig, ServerConfig, engine_identity
from pipeline.config.experiment import (
    ExperimentConfig,
    PruneConfig,
    StudentConfig,
    TeacherConfig,
    load_config,
    load_raw,
    parse_overrides,
    resolved_dict,
    validate_config,
    with_overrides,
)
from pipeline.config.filter import SAMPLE_FILTERS, FilterConfig
from pipeline.config.sweep import SweepConfig
from pipeline.config.train import ReplayConfig, TrainConfig

__all__ = [
    "HOW_A_SERVER_IS_ASKED",
    "SAMPLE_FILTERS",
    "BenchmarkConfig",
    "BenchmarkJudgeConfig",
    "ConfigError",
    "EngineConfig",
    "ExperimentConfig",
    "FilterConfig",
    "HardwareConfig",
    "LmEvalConfig",
    "LoadTestConfig",
    "PromoteConfig",
    "PruneConfig",
    "ReplayConfig",
    "SamplingConfig",
    "ServerConfig",
    "StudentConfig",
    "SweepConfig",
    "SystemConfig",
    "TeacherConfig",
    "TrainConfig",
    "VerdictConfig",
    "engine_identity",
    "load_config",
    "load_raw",
    "parse_overrides",
    "resolved_dict",
    "validate_config",
    "with_overrides",
]
