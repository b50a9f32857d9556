"""Every run priced and judged on the machine it ran on: profiles, detection, roofline shares, engine wording.

No GPU exists here: the CUDA device is faked by its name (pipeline.hardware.cuda_accelerator), as torch reports it.
"""

from __future__ import annotations

import json

import pytest
from msgspec import UNSET

from pipeline import hardware
from pipeline.benchmark import report
from pipeline.benchmark.costs import add_costs, resolve_hardware
from pipeline.benchmark.results import LoadLevel, Report, SystemResult, convert, to_builtins
from pipeline.benchmark.systems import System
from pipeline.config import validate_config


def config(**benchmark):
    """The `benchmark` section of a config with these keys."""
    raw = {"run_name": "x", "task": {"name": "support"}, "teacher": {"model": "m"}, "student": {"model": "m"}}
    return validate_config({**raw, "benchmark": benchmark}).benchmark


def _hardware_note(numbers: dict) -> str:
    """The report's hardware sentence, of a report as report.json holds it."""
    return report._hardware_note(convert(numbers, Report))


def fake_gpu(monkeypatch, name: str, count: int = 1) -> None:
    import torch

    monkeypatch.setattr(hardware, "cuda_accelerator", lambda: (name, hardware.accelerator_for(name)))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def results(requests_per_s: float = 2.0, **more: float) -> dict[str, SystemResult]:
    offline = {"requests_per_s": requests_per_s, "output_tokens_per_s": 100.0, "prompt_tokens_per_s": 400.0}
    names = ("teacher", "student_base", "student_prompted", "student_tuned")
    return convert({name: {"offline": dict(offline), **more} for name in names}, dict[str, SystemResult])


def systems(**engines) -> list[System]:
    """The four systems of the default benchmark, on benchmark.engine unless given their own."""
    return [System(name, "m", "short", False, engine=engines.get(name)) for name in results()]


def test_an_h100_is_detected_priced_and_said(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", count=8)
    chosen = resolve_hardware(config())
    assert (chosen.serving, chosen.pipeline, chosen.serving_source) == ("h100", "h100", "detected")
    assert (chosen.machine.device, chosen.machine.count) == ("NVIDIA H100 80GB HBM3", 8)
    measured = results()
    add_costs(chosen, config(), systems(), measured)
    tuned = measured["student_tuned"]
    assert (tuned.hardware, tuned.usd_per_hour, tuned.devices) == ("h100", 3.00, 1)  # one replica, one GPU
    assert tuned.cost_per_1k_requests == pytest.approx(3.00 / 3600 / 2.0 * 1000)  # $/hour over requests/s
    sentence = _hardware_note({"hardware": to_builtins(chosen.record())})
    assert sentence == (
        "Ran on 8 x NVIDIA H100 80GB HBM3. Systems and the one-off generate + train are priced on `h100` "
        "(detected; $3.00/hour, 3,350 GB/s, 989 TFLOP/s). "
    )
    # A configured profile wins over detection, and the report says which was which.
    chosen = resolve_hardware(config(serving_hardware="a10g"))
    assert (chosen.serving, chosen.serving_source, chosen.pipeline, chosen.pipeline_source) == (
        "a10g",
        "configured",
        "h100",
        "detected",
    )
    assert "Systems are priced on `a10g` (configured; $1.01/hour" in _hardware_note(
        {"hardware": to_builtins(chosen.record())}
    )
    mixed = {
        "hardware": to_builtins(chosen.record()),
        "systems": {"teacher": {"hardware": "h200"}, "student": {"hardware": "a10g"}},
    }
    assert "(systems that name their own `hardware` on theirs: `h200`)" in _hardware_note(mixed)


def write_manifest(folder, wall_s: float, **metrics) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"wall_s": wall_s, "metrics": metrics}))


def test_a_multi_gpu_node_is_priced_on_the_gpus_each_stage_and_replica_held(monkeypatch, tmp_path):
    """8 H100s at $3.00 each: generate on one GPU for an hour, train on all eight (accelerate) for half an hour
    is 1 + 4 GPU-hours, $15.00, not the $4.50 of one GPU's price; a replica split over two GPUs costs $6.00/hour."""
    from pipeline.benchmark.costs import one_off_cost
    from pipeline.config import EngineConfig
    from pipeline.layout import RunLayout

    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", count=8)
    layout = RunLayout(tmp_path / "run")
    write_manifest(layout.stage_dir("generate"), 3600, gpus=1)
    write_manifest(layout.stage_dir("train"), 1800, gpus=8, processes=8)
    bench = config()
    chosen = resolve_hardware(bench)
    one_off = one_off_cost(layout, EngineConfig(), bench, chosen)
    assert one_off.one_off_usd == pytest.approx(15.00)
    assert one_off.one_off_devices == {"generate": 1, "train": 8}
    assert report._one_off_said(one_off) == (
        "generate 3,600 s on 1 device, train 1,800 s on 8 devices, of `h100` at $3.00/hour each, 5.00 device-hours"
    )
    # On-policy training counts the teacher's scored tokens apart from the student's sampled ones.
    write_manifest(layout.stage_dir("train"), 1800, gpus=8, teacher_scored_tokens=120_000, student_sampled_tokens=8_000)
    assert report._one_off_said(one_off_cost(layout, EngineConfig(), bench, chosen)).endswith(
        "5.00 device-hours; in train, the teacher scored 120,000 tokens (its prompt and the student's answer, "
        "prefill only) and the student sampled 8,000"
    )
    # Generate sharded over 4 Ray workers of 2 GPUs each (tensor parallel): every shard's GPU-hours count.
    write_manifest(layout.stage_dir("generate"), 5, gpus=0, shards=4)
    for index in range(4):
        write_manifest(layout.stage_dir(RunLayout.shard_name(index, 4)), 900, gpus=2)
    sharded = one_off_cost(layout, EngineConfig(), bench, chosen)
    assert sharded.one_off_device_hours["generate"] == pytest.approx(4 * 0.25 * 2 + 5 / 3600)
    assert sharded.one_off_wall_s["generate"] == 905 and sharded.one_off_devices["generate"] == 8
    # Serving: a replica split over two GPUs (tensor parallel) costs two GPUs' hours.
    measured = results()
    split = EngineConfig(tensor_parallel_size=2)
    add_costs(chosen, bench, systems(teacher=split), measured)
    teacher, tuned = measured["teacher"], measured["student_tuned"]
    assert (teacher.devices, teacher.usd_per_hour) == (2, 6.00) and tuned.usd_per_hour == 3.00
    assert teacher.cost_per_1k_requests == pytest.approx(2 * tuned.cost_per_1k_requests)
    text = report._cost_note(convert({"systems": to_builtins(measured)}, Report))
    assert "(devices per replica: `teacher` 2)" in text


def test_on_policy_through_a_hosted_teacher_bills_its_scored_tokens_at_the_input_price(tmp_path):
    """The hosted teacher's generate tokens at its list price, the tokens it scored for on-policy training at its
    input price, and training's own time on the pipeline's machine: the break-even's one-off cost is all three."""
    from pipeline.benchmark.costs import one_off_cost
    from pipeline.config import EngineConfig, ServerConfig
    from pipeline.files import write_jsonl
    from pipeline.layout import RunLayout

    price = {"usd_per_1m_input_tokens": 2.5, "usd_per_1m_output_tokens": 10.0}
    bench = config(
        systems=[
            {"name": "teacher", "model": "teacher", "price": price},
            {"name": "student_base", "model": "student"},
            {"name": "student_tuned", "model": "tuned"},
        ],
        pipeline_hardware="cpu-2core",
    )
    layout = RunLayout(tmp_path / "run")
    layout.teacher_outputs.parent.mkdir(parents=True)
    write_jsonl(layout.teacher_outputs, [{"usage": {"prompt_tokens": 1000, "completion_tokens": 200}}] * 4)
    write_manifest(layout.stage_dir("generate"), 600)
    write_manifest(layout.stage_dir("train"), 3600, teacher_scored_tokens=400_000, student_sampled_tokens=9_000)
    hosted = EngineConfig(backend="openai", server=ServerConfig(base_url="https://api.example.com/v1"))
    even = one_off_cost(layout, hosted, bench, resolve_hardware(bench))
    generate, scoring = (4000 * 2.5 + 800 * 10.0) / 1e6, 400_000 * 2.5 / 1e6
    hour = bench.hardware_profiles["cpu-2core"].usd_per_hour
    assert (even.generate_usd_at_list_price, even.scoring_usd_at_list_price) == pytest.approx((generate, scoring))
    assert even.one_off_usd == pytest.approx(generate + scoring + hour)
    assert "train's scoring $1.0000, the tokens it scored at its input price" in report._one_off_said(even)


def test_a_profile_that_sets_only_a_price_keeps_the_datasheet_limits():
    given = config(hardware_profiles={"h100": {"usd_per_hour": 2.5}, "mine": {"usd_per_hour": 1.0}})
    h100 = given.hardware_profiles["h100"]
    assert (h100.usd_per_hour, h100.memory_gbps, h100.peak_tflops) == (2.5, 3350.0, 989.0)
    assert given.hardware_profiles["mine"].peak_tflops is None and "h200" in given.hardware_profiles
    unset = config(hardware_profiles={"h100": {"peak_tflops": None}})  # a limit removed on purpose stays removed
    assert unset.hardware_profiles["h100"].peak_tflops is None and unset.hardware_profiles["h100"].usd_per_hour == 3.0
    with pytest.raises(ValueError, match="usd_per_hour"):
        config(hardware_profiles={"new": {"peak_tflops": 10}})  # a new profile needs its price


def test_training_mfu_is_taken_against_the_profile_the_benchmark_uses(monkeypatch):
    """The trainer is faked (a GPU cannot exist here): 8,000 tokens in one second on 8 GPUs is 1,000 tokens/s per
    GPU, at 4 FLOPs per parameter per token for LoRA; a peak the user sets reaches MFU as it reaches the roofline."""
    from types import SimpleNamespace

    from pipeline.train import stage_trainer

    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", count=8)
    monkeypatch.setattr(stage_trainer, "model_parameters", lambda model: 1_000_000_000)
    trainer = SimpleNamespace(
        state=SimpleNamespace(log_history=[{"num_tokens": 8000}]),
        args=SimpleNamespace(use_cpu=False, world_size=8),
        model=None,
    )
    profiles = config(hardware_profiles={"h100": {"peak_tflops": 500.0}}).hardware_profiles
    metrics = stage_trainer.throughput_metrics(trainer, 1.0, full=False, profiles=profiles)
    assert metrics["peak_tflops"] == 500.0 and metrics["mfu"] == round(1000 * 4e9 / 500e12, 4)
    assert (metrics["gpus"], metrics["hardware_profile"]) == (8, "h100")
    default = stage_trainer.throughput_metrics(trainer, 1.0, full=False, profiles=config().hardware_profiles)
    assert default["peak_tflops"] == 989.0
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 4090")  # no limits known: no MFU, and no guess
    unknown = stage_trainer.throughput_metrics(trainer, 1.0, full=False, profiles=config().hardware_profiles)
    assert "mfu" not in unknown and unknown["hardware_profile"] == "unknown-gpu"


def test_an_unknown_gpu_gets_the_unknown_profile_and_one_line_naming_the_keys(monkeypatch, capsys):
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 4090")
    chosen = resolve_hardware(config())
    assert chosen.serving == chosen.pipeline == hardware.UNKNOWN_GPU
    assert chosen.profiles[hardware.UNKNOWN_GPU].memory_gbps is None  # no roofline share without a limit
    logged = [line for line in capsys.readouterr().err.splitlines() if "no hardware profile" in line]
    assert len(logged) == 1 and "'NVIDIA GeForce RTX 4090'" in logged[0]
    assert "set benchmark.serving_hardware and benchmark.pipeline_hardware" in logged[0]
    assert "limits unknown" in _hardware_note({"hardware": to_builtins(chosen.record())})
    resolve_hardware(config(serving_hardware="h100", pipeline_hardware="h100"))  # both set: nothing to say
    assert "no hardware profile" not in capsys.readouterr().err


def test_this_cpu_is_measured_and_keeps_the_cpu_2core_price(monkeypatch):
    monkeypatch.setattr(hardware, "cuda_accelerator", lambda: None)
    machine = hardware.Machine("CPU (2 cores)", 2, "cpu-2core", gpu=False)
    chosen = resolve_hardware(config(), machine)
    profile = chosen.profiles["cpu-2core"]
    assert profile.usd_per_hour == 0.10 and profile.memory_gbps > 0.5 and profile.peak_tflops > 1e-4
    sixteen = resolve_hardware(config(), hardware.Machine("CPU (16 cores)", 16, "cpu-16core", gpu=False))
    assert sixteen.serving == "cpu-16core" and sixteen.profiles["cpu-16core"].usd_per_hour == pytest.approx(0.80)
    # A CPU profile the user gave limits keeps them: a measurement does not overwrite a setting.
    given = config(hardware_profiles={"cpu-2core": {"usd_per_hour": 0.2, "memory_gbps": 5.0}})
    assert resolve_hardware(given, machine).profiles["cpu-2core"].memory_gbps == 5.0
    assert "measured here" in _hardware_note({"hardware": to_builtins(chosen.record())})


def rendered_report(tmp_path, engine: str, hardware: str = "cpu-2core", **tuned) -> str:
    """report.md of a small, complete report: four systems measured on a 2-core CPU, priced on `hardware`."""
    path = tmp_path / engine / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    report.write_report(convert(report_numbers(engine, hardware, **tuned), Report), path)
    return path.read_text()


def report_numbers(engine: str, hardware: str = "cpu-2core", **tuned) -> dict:
    """A small, complete report as report.json holds it: four systems measured on a 2-core CPU."""

    def system(accuracy: float, **more) -> dict:
        return {
            "accuracy": accuracy,
            "accuracy_ci95": [accuracy - 0.1, accuracy],
            "prompt_style": "short",
            "model": "m",
            "mean_prompt_tokens": 100.0,
            "latency_p50_s": 1.0,
            "latency_cold_p50_s": 1.2,
            "output_tokens_per_s": 50.0,
            "cost_per_1m_input_tokens": 0.1,
            "cost_per_1m_output_tokens": 1.0,
            "cost_per_1k_requests": 0.01,
            "rule_accuracy": {"label": accuracy},
            "hardware": hardware,
            "measured_on": "CPU (2 cores)",
            **more,
        }

    numbers = {
        "run_name": "r",
        "task": "t",
        "test_examples": 20,
        "engine": engine,
        "hardware": {
            "device": "CPU (2 cores)",
            "count": 2,
            "detected_profile": "cpu-2core",
            "serving_hardware": hardware,
            "serving_source": "detected" if hardware == "cpu-2core" else "configured",
            "pipeline_hardware": "cpu-2core",
            "pipeline_source": "detected",
            "profiles": {
                "cpu-2core": {"usd_per_hour": 0.1, "memory_gbps": 10.0, "peak_tflops": 0.1},
                "a10g": {"usd_per_hour": 1.01, "memory_gbps": 600.0},
            },
        },
        "systems": {
            "teacher": system(0.9),
            "student_base": system(0.1),
            "student_prompted": system(0.5),
            "student_tuned": system(0.85, **tuned),
        },
        "comparisons": {
            "student_tuned_vs": {
                "student_base": {
                    "p_value": 0.001,
                    "accuracy_diff": 0.75,
                    "tuned_only_correct": 15,
                    "other_only_correct": 0,
                }
            }
        },
    }
    return numbers


@pytest.mark.parametrize(
    ("engine", "tuned", "said", "not_said"),
    [
        (
            "vllm",
            {"serving": "base + unmerged LoRA adapter"},
            ["(vLLM `enable_lora`)", "served from vLLM's prefix cache"],
            ["no prefix cache"],
        ),
        (
            "transformers",
            {"serving": "base + unmerged LoRA adapter"},
            ["(a PEFT model on the transformers engine)", "which has no prefix cache"],
            ["vLLM", "vllm"],
        ),
        (
            "openai",
            {"server": "http://tuned:8000/v1"},
            ["served by its own server", "whether the server caches prompt prefixes is its own business"],
            ["vLLM", "merged weights", "enable_lora"],
        ),
    ],
)
def test_report_md_says_what_the_engine_that_ran_did(tmp_path, engine, tuned, said, not_said):
    from pipeline.benchmark.plots import cold_label

    text = rendered_report(tmp_path, engine, **tuned)
    assert all(words in text for words in said), text
    assert not any(words in text for words in not_said), text
    legend = cold_label(engine)  # the latency plot's cold bar
    assert ("cleared" in legend) == (engine == "vllm") and ("no prefix cache" in legend) == (engine == "transformers")


def test_a_system_priced_on_another_profile_says_its_speed_was_measured_here(tmp_path):
    """`serving_hardware: a10g` on a CPU: the price is an A10G's hour at this CPU's throughput, and the
    roofline share is against the CPU's own limits, never the A10G's bandwidth."""
    bench = config(serving_hardware="a10g")
    chosen = resolve_hardware(bench, hardware.Machine("CPU (2 cores)", 2, "cpu-2core", gpu=False))
    measured = results()
    add_costs(chosen, bench, systems(), measured)
    tuned = measured["student_tuned"]
    assert (tuned.hardware, tuned.measured_on, tuned.usd_per_hour) == ("a10g", "CPU (2 cores)", 1.01)
    text = rendered_report(tmp_path, "vllm", hardware="a10g")
    assert (
        "`teacher`, `student_base`, `student_prompted`, `student_tuned` are priced on `a10g` but their speed was "
        "measured here, on CPU (2 cores): the cost is `a10g`'s hour at this machine's throughput, not a "
        "measurement on `a10g`, and the roofline shares are against this machine's limits."
    ) in text
    assert "priced on `a10g` but" not in rendered_report(tmp_path / "here", "vllm")  # priced where measured


def test_an_unknown_gpu_gets_no_roofline_share(monkeypatch, tmp_path):
    import torch
    from safetensors.torch import save_file

    from pipeline.benchmark.roofline import add_roofline_shares

    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a": torch.zeros(10, 50)}, str(folder / "model.safetensors"))
    bench = config(hardware_profiles={"mine": {"usd_per_hour": 0.5, "memory_gbps": 1000.0}}, serving_hardware="mine")
    tuned = [System("student_tuned", str(folder), "short", True)]
    measured = {"student_tuned": results(single_request_output_tokens_per_s=100.0)["student_tuned"]}
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3")
    add_roofline_shares(resolve_hardware(bench), bench, tuned, measured)
    assert measured["student_tuned"].decode_roofline_share > 0  # a known GPU: its own limits
    measured = {"student_tuned": results(single_request_output_tokens_per_s=100.0)["student_tuned"]}
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 4090")  # priced on `mine`, whose bandwidth is not this GPU's
    add_roofline_shares(resolve_hardware(bench), bench, tuned, measured)
    assert measured["student_tuned"].decode_roofline_share is UNSET
    assert measured["student_tuned"].batched_compute_share is UNSET


def test_the_roofline_counts_the_weights_a_token_goes_through(tmp_path):
    """A decode step reads the head, not the input embedding table (one row looked up), unless they are tied;
    a prompt token skips the head too (logits for the last prompt position only)."""
    import torch
    from safetensors.torch import save_file

    from pipeline.benchmark.roofline import weight_counts

    layers = {"model.layers.0.mlp.up_proj.weight": torch.zeros(8, 100)}  # 800
    untied, tied = tmp_path / "untied", tmp_path / "tied"
    for folder, head in ((untied, {"lm_head.weight": torch.zeros(50, 8)}), (tied, {})):
        folder.mkdir()
        save_file({"model.embed_tokens.weight": torch.zeros(50, 8), **layers, **head}, str(folder / "m.safetensors"))
    assert weight_counts(untied) == (1600, 1200, 800)
    assert weight_counts(tied) == (1200, 1200, 800)


def test_decode_roofline_share_is_speed_over_bandwidth_per_weight_byte(tmp_path):
    """A 1,000-parameter fp32 checkpoint on a 4 GB/s machine: the ceiling is 4e9 / 4,000 B = 1e6 tok/s."""
    import torch
    from safetensors.torch import save_file

    from pipeline.benchmark.roofline import add_roofline_shares, weight_counts
    from pipeline.benchmark.systems import System

    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a": torch.zeros(10, 50), "b": torch.zeros(500)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    assert weight_counts(folder) == (1000, 1000, 1000)  # no embedding table recognised: every weight counts
    # The limits are this machine's (a CPU's, given here so they do not depend on the probe); the profile the
    # systems are priced on ("box", twice as fast) plays no part in them.
    profiles = {"cpu-2core": {"memory_gbps": 4.0, "peak_tflops": 1.0}, "box": {"usd_per_hour": 1, "memory_gbps": 8.0}}
    cfg = config(engine={"backend": "transformers"}, hardware_profiles=profiles, serving_hardware="box")
    chosen = resolve_hardware(cfg, hardware.Machine("CPU (2 cores)", 2, "cpu-2core", gpu=False))
    measured = {"student_tuned": results(single_request_output_tokens_per_s=50_000.0)["student_tuned"]}
    add_roofline_shares(chosen, cfg, [System("student_tuned", str(folder), "short", True)], measured)
    tuned = measured["student_tuned"]
    assert (tuned.weight_dtype, tuned.weight_bytes) == ("float32", 4000)  # the CPU engine holds fp32
    assert tuned.decode_roofline_share == pytest.approx(0.05)
    assert tuned.batched_compute_share == pytest.approx(2 * 1000 * 500 / 1e12)
    tuned.load = {"1": LoadLevel(tpot_p50_s=1e-5)}  # through the server: time per output token wins
    add_roofline_shares(chosen, cfg, [System("student_tuned", str(folder), "short", True)], measured)
    assert tuned.decode_roofline_share == pytest.approx(0.1) and tuned.decode_basis.startswith("vllm serve")
    # On vLLM with its prefix cache a shared prompt prefix is not computed again: only output tokens count.
    cached = config(engine={"backend": "vllm"}, hardware_profiles=profiles, serving_hardware="box")
    add_roofline_shares(chosen, cached, [System("student_tuned", str(folder), "short", True)], measured)
    output_only = 2 * 1000 * tuned.offline.output_tokens_per_s / 1e12
    assert tuned.batched_compute_share == pytest.approx(output_only) and output_only < 2 * 1000 * 500 / 1e12
    assert tuned.batched_compute_basis == "output tokens (prefix cache on)"


def test_attention_leaves_cudnn_out_on_cuda_only():
    """The backend flags are torch's global state and exist in CPU builds too: "cuda" here fakes only the device."""
    import torch

    def flags():
        c = torch.backends.cuda
        return c.cudnn_sdp_enabled(), c.flash_sdp_enabled(), c.mem_efficient_sdp_enabled(), c.math_sdp_enabled()

    before = flags()
    assert before[0]  # torch's default, which the context must restore
    with hardware.attention_without_cudnn("cuda"):
        assert flags() == (False, True, True, True)
    assert flags() == before
    with hardware.attention_without_cudnn("cpu"):
        assert flags() == before


# The names `torch.cuda.get_device_name()` returns on the parts users rent, and the entry each gets:
# (profile, dense bf16 TFLOP/s, GB/s); None for a GPU the table lacks.
CUDA_NAMES = [
    ("NVIDIA H100 80GB HBM3", ("h100", 989.0, 3350.0)),
    ("NVIDIA H100 PCIe", ("h100-pcie", 756.0, 2000.0)),
    ("NVIDIA H100 NVL", ("h100-nvl", 835.0, 3900.0)),
    ("NVIDIA H200", ("h200", 989.0, 4800.0)),
    ("NVIDIA H200 NVL", ("h200-nvl", 835.0, 4800.0)),
    ("NVIDIA A100-SXM4-80GB", ("a100-80gb", 312.0, 2039.0)),
    ("NVIDIA A100-SXM4-40GB", ("a100-40gb", 312.0, 1555.0)),
    ("NVIDIA A100 80GB PCIe", ("a100-80gb-pcie", 312.0, 1935.0)),
    ("NVIDIA A100-PCIE-40GB", ("a100-40gb", 312.0, 1555.0)),
    ("NVIDIA L4", ("l4", 121.0, 300.0)),
    ("NVIDIA L40S", ("l40s", 362.0, 864.0)),
    ("NVIDIA L40", ("l40", 181.0, 864.0)),
    ("NVIDIA A10G", ("a10g", None, 600.0)),  # no published tensor peak: unset, not the A10's
    ("NVIDIA A10", ("a10", 125.0, 600.0)),
    ("NVIDIA GH200 480GB", None),  # not an H200: its memory differs by version
    ("Tesla T4", None),
    ("NVIDIA GeForce RTX 4090", None),
]


@pytest.mark.parametrize(("cuda_name", "expected"), CUDA_NAMES)
def test_each_cuda_name_gets_its_own_datasheet_entry(cuda_name, expected):
    accelerator = hardware.accelerator_for(cuda_name)
    found = None if accelerator is None else (accelerator.name, accelerator.peak_tflops, accelerator.memory_gbps)
    assert found == expected


def test_no_table_key_is_shadowed_by_an_earlier_less_specific_one():
    """Keys match in order, so a key whose words all belong to a later key would hide that later entry."""
    keys = [key for key, _ in hardware.ACCELERATORS]
    for later, key in enumerate(keys):
        for earlier in keys[:later]:
            assert not set(earlier.split()) <= set(key.split()), f"{earlier!r} hides {key!r}"
    names = [accelerator.name for _, accelerator in hardware.ACCELERATORS]
    assert len(set(names)) == len(names) == len(set(keys))


def test_a_part_at_least_as_fast_on_both_limits_never_costs_less():
    """The indicative prices stay consistent with the limits: an NVL or PCIe part below its SXM sibling, the L40
    below the L40S. Entries without a compute peak are left out: nothing to compare them by."""
    known = [a for _, a in hardware.ACCELERATORS if a.peak_tflops is not None]
    for a in known:
        for b in known:
            if a.peak_tflops >= b.peak_tflops and a.memory_gbps >= b.memory_gbps:
                assert a.usd_per_hour >= b.usd_per_hour, (a.name, b.name)
    assert all(a.usd_per_hour > 0 for _, a in hardware.ACCELERATORS)


def test_the_default_profiles_are_the_table_and_an_a10g_says_no_compute_peak():
    profiles = config().hardware_profiles
    for _, a in hardware.ACCELERATORS:
        assert (profiles[a.name].peak_tflops, profiles[a.name].memory_gbps) == (a.peak_tflops, a.memory_gbps)
        assert profiles[a.name].usd_per_hour == a.usd_per_hour
    chosen = resolve_hardware(config(serving_hardware="a10g", pipeline_hardware="a10g"))
    sentence = _hardware_note({"hardware": to_builtins(chosen.record())})
    assert "`a10g` (configured; $1.01/hour, 600 GB/s)" in sentence and "TFLOP/s" not in sentence
