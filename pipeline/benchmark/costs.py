"""What serving each system costs, from its machine's $/hour (`benchmark.hardware_profiles`) and its measured
throughput, and when distilling pays for itself (break-even)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from msgspec import UNSET, structs

from pipeline import names
from pipeline.benchmark.results import (
    LIST_PRICE_BASIS,
    BreakEven,
    HardwareProfile,
    HardwareRecord,
    PairedComparison,
    Payback,
    SystemResult,
)
from pipeline.benchmark.systems import System
from pipeline.config import BenchmarkConfig, EngineConfig, HardwareConfig, SystemConfig, VerdictConfig
from pipeline.console import log
from pipeline.files import read_jsonl
from pipeline.hardware import CPU_USD_PER_CORE_HOUR, UNKNOWN_GPU, Machine, detect_machine, probe_cpu
from pipeline.layout import RunLayout, read_manifest


def cost_per_1m_tokens(usd_per_hour: float, tokens_per_s: float) -> float:
    return usd_per_hour / (tokens_per_s * 3600) * 1e6 if tokens_per_s > 0 else float("inf")


@dataclass
class Hardware:
    """The profiles a benchmark prices and judges systems by: which one serves, which one ran generate + train,
    whether each was configured or detected, and the machine detected."""

    machine: Machine
    profiles: dict[str, HardwareConfig]  # the configured ones, this CPU's limits measured
    serving: str
    pipeline: str
    serving_source: str  # "configured" or "detected"
    pipeline_source: str

    def for_system(self, system: SystemConfig) -> tuple[str, HardwareConfig]:
        """The profile a system is priced on: its own `hardware`, else serving_hardware."""
        key = system.hardware or self.serving
        return key, self.profiles[key]

    @property
    def measuring(self) -> HardwareConfig | None:
        """The limits of the machine that measured every locally served system (its own profile, a CPU's
        measured here): a share of a limit means something only for the machine that ran."""
        return self.profiles.get(self.machine.profile)

    def record(self) -> HardwareRecord:
        """report.json's `hardware`."""
        return HardwareRecord(
            device=self.machine.device,
            count=self.machine.count,
            detected_profile=self.machine.profile,
            serving_hardware=self.serving,
            serving_source=self.serving_source,
            pipeline_hardware=self.pipeline,
            pipeline_source=self.pipeline_source,
            profiles={name: HardwareProfile(**profile.model_dump()) for name, profile in self.profiles.items()},
        )


def resolve_hardware(bench: BenchmarkConfig, machine: Machine | None = None) -> Hardware:
    """Pick the serving and pipeline profiles: the configured ones, else this machine's (detected). A CPU
    profile for this machine's core count gets limits measured here when it has none (and a per-core price
    when it is not declared). An unknown GPU is priced as `unknown-gpu`, and one log line says which keys to
    set."""
    machine = machine or detect_machine()
    profiles = dict(bench.hardware_profiles)
    if not machine.gpu:
        own = profiles.get(machine.profile) or HardwareConfig(usd_per_hour=machine.count * CPU_USD_PER_CORE_HOUR)
        if own.peak_tflops is None or own.memory_gbps is None:
            tflops, gbps = probe_cpu()
            own = own.model_copy(
                update={"peak_tflops": own.peak_tflops or tflops, "memory_gbps": own.memory_gbps or gbps}
            )
        profiles[machine.profile] = own
    elif machine.profile == UNKNOWN_GPU and None in (bench.serving_hardware, bench.pipeline_hardware):
        log(
            f"benchmark: GPU {machine.device!r} has no hardware profile: priced as {UNKNOWN_GPU} "
            f"(${profiles[UNKNOWN_GPU].usd_per_hour:.2f}/hour, no limits); set benchmark.serving_hardware and "
            "benchmark.pipeline_hardware to a profile of benchmark.hardware_profiles (add one with your price)"
        )
    return Hardware(
        machine,
        profiles,
        bench.serving_hardware or machine.profile,
        bench.pipeline_hardware or machine.profile,
        "configured" if bench.serving_hardware else "detected",
        "configured" if bench.pipeline_hardware else "detected",
    )


def add_costs(
    hardware: Hardware, bench: BenchmarkConfig, systems: list[System], results: dict[str, SystemResult]
) -> None:
    """$ per 1M input/output tokens and per 1k requests for each system, from the server's throughput at the
    cost concurrency (or, without a load test, the offline batched run), on the devices one replica holds. A
    system priced on another profile than the machine that measured it says so (`measured_on`): its price is
    that machine's hour, its throughput this one's."""
    level = str(bench.load_test.cost_concurrency or max(bench.load_test.concurrency))
    engines = {s.name: s.engine or bench.engine for s in systems}
    for declared in bench.systems:
        system = results[declared.name]
        if declared.price is not None:  # a hosted API: what its tokens cost, whatever machine serves them
            price = declared.price
            per_request = system.mean_prompt_tokens * price.usd_per_1m_input_tokens
            per_request += system.mean_output_tokens * price.usd_per_1m_output_tokens
            system.cost_per_1m_input_tokens = price.usd_per_1m_input_tokens
            system.cost_per_1m_output_tokens = price.usd_per_1m_output_tokens
            system.cost_per_1k_requests = per_request / 1e6 * 1000
            system.hardware, system.usd_per_hour, system.cost_basis = None, None, LIST_PRICE_BASIS
            continue
        name, profile = hardware.for_system(declared)
        load = system.load or {}
        if level in load:
            throughput, basis = load[level], f"vllm serve at concurrency {level}"
        else:
            throughput, basis = system.offline, "offline engine, batched"
        # What the replica's hour buys at the measured throughput: each per-token price charges the whole replica
        # to that one kind of token.
        devices = engines[declared.name].devices_per_replica
        usd_per_hour = profile.usd_per_hour * devices
        system.devices = devices
        if system.server is UNSET:  # measured here, not through a server on its own machine
            system.measured_on = hardware.machine.device
        system.cost_per_1m_input_tokens = cost_per_1m_tokens(usd_per_hour, throughput.prompt_tokens_per_s)
        system.cost_per_1m_output_tokens = cost_per_1m_tokens(usd_per_hour, throughput.output_tokens_per_s)
        system.cost_per_1k_requests = cost_per_1m_tokens(usd_per_hour, throughput.requests_per_s) / 1000
        system.hardware, system.usd_per_hour, system.cost_basis = name, usd_per_hour, basis


def why_no_break_even(
    results: dict[str, SystemResult], baseline: str, rules: VerdictConfig, p_value: float | None = None
) -> str | None:
    """Why a saving of the tuned student over `baseline` means nothing, or None when it does. Against the teacher
    it is the price of replacing it, so the teacher must have had something to teach (for any baseline); against
    prompting, the tuned student must answer at least as well (not worse by the paired test `p_value`, as the
    verdict judges it). A cheaper answer that is never right saves nothing."""
    tuned = results[names.STUDENT_TUNED].accuracy
    other = results[baseline].accuracy
    teacher = results[names.TEACHER].accuracy
    if teacher <= rules.min_teacher_accuracy:  # a saving over a system that cannot do the task means nothing
        return f"the teacher scores {teacher:.1%}, too low for a saving to mean anything"
    if tuned == 0:
        return "the tuned student scores 0%"
    worse = tuned < other and (p_value is None or p_value < rules.significance)
    if baseline != names.TEACHER and worse:
        return f"the tuned student is less accurate ({tuned:.1%} vs {other:.1%})"
    return None


def lower_beyond_noise(ratio: float, rules: VerdictConfig) -> bool:
    """Whether the tuned student's cost (or p50 latency) over another system's counts as lower: by more than one
    load test's noise (`benchmark.verdict.min_serving_gain`). The verdict and the break-even both judge by it."""
    return ratio < 1 - rules.min_serving_gain


def saving_within_noise(tuned_cost: float, other_cost: float, rules: VerdictConfig) -> str | None:
    """Why a lower cost of the tuned student is no saving: it is lower, but not beyond the noise of one load
    test; None when it is a saving, or not lower at all."""
    ratio = tuned_cost / other_cost if other_cost > 0 else 1.0
    if ratio < 1 and not lower_beyond_noise(ratio, rules):
        return (
            f"the tuned student is only {1 - ratio:.1%} cheaper per request, within one load test's noise "
            f"(benchmark.verdict.min_serving_gain {rules.min_serving_gain:g})"
        )
    return None


def stage_gpu_hours(layout: RunLayout, stage: str) -> tuple[float, int, float]:
    """(wall seconds, devices, device-hours) of a finished stage, from its manifest: the GPUs it held (`gpus`,
    recorded since multi-GPU runs were priced whole; 0 on a CPU, and older manifests, count as one device of
    the pipeline's profile). A generate merged from shards (Ray workers, a Slurm array) sums its shards'
    device-hours, and its wall time is the longest shard's plus the merge's."""
    manifest = read_manifest(layout.stage_dir(stage))
    if not manifest:
        return 0.0, 0, 0.0
    metrics = manifest.get("metrics", {})
    devices = max(int(metrics.get("gpus") or 0), 1)
    wall, hours = manifest["wall_s"], manifest["wall_s"] / 3600 * devices
    shards = int(metrics.get("shards") or 0) if stage == "generate" else 0
    parts = [read_manifest(layout.stage_dir(RunLayout.shard_name(i, shards))) for i in range(shards)]
    parts = [part for part in parts if part]
    if parts:
        per_shard = [max(int(part.get("metrics", {}).get("gpus") or 0), 1) for part in parts]
        devices = sum(per_shard)
        hours += sum(part["wall_s"] / 3600 * n for part, n in zip(parts, per_shard, strict=True))
        wall += max(part["wall_s"] for part in parts)
    return wall, devices, hours


def one_off_cost(
    layout: RunLayout, teacher_engine: EngineConfig, bench: BenchmarkConfig, hardware: Hardware
) -> BreakEven:
    """What distilling cost once: generate + train on pipeline_hardware, each stage's wall time times the
    devices it held (their manifests), or, for a hosted teacher with a list price, the tokens it billed for
    generate and train's device time. A `BreakEven` with its one-off fields set; `break_even` adds the
    paybacks."""
    walls, devices, hours = {}, {}, {}
    for stage in ("generate", "train"):
        walls[stage], devices[stage], hours[stage] = stage_gpu_hours(layout, stage)
    usd_per_hour = hardware.profiles[hardware.pipeline].usd_per_hour
    one_off = sum(hours.values()) * usd_per_hour
    teacher_price = next((s.price for s in bench.systems if s.name == names.TEACHER), None)
    trained = (read_manifest(layout.stage_dir("train")) or {}).get("metrics", {})
    generate_usd = scoring_usd = None
    if teacher_price is not None and teacher_engine.backend == "openai":
        # A hosted teacher bills its tokens: generating cost those, not this machine's hours waiting on it.
        prompt_tokens, output_tokens = teacher_tokens(layout.teacher_outputs)
        generate_usd = (
            prompt_tokens * teacher_price.usd_per_1m_input_tokens
            + output_tokens * teacher_price.usd_per_1m_output_tokens
        ) / 1e6
        # On-policy training scored the student's answers on that server (on_policy.teacher_server): input tokens.
        scored = trained.get("teacher_scored_tokens") or 0
        scoring_usd = scored * teacher_price.usd_per_1m_input_tokens / 1e6 if scored else None
        one_off = generate_usd + (scoring_usd or 0.0) + hours["train"] * usd_per_hour
    return BreakEven(
        teacher_scored_tokens=trained.get("teacher_scored_tokens", UNSET),
        student_sampled_tokens=trained.get("student_sampled_tokens", UNSET),
        one_off_usd=one_off,
        generate_usd_at_list_price=generate_usd,
        scoring_usd_at_list_price=scoring_usd,
        one_off_wall_s=walls,
        one_off_devices=devices,
        one_off_device_hours=hours,
        pipeline_hardware=hardware.pipeline,
        pipeline_usd_per_hour=usd_per_hour,
        requests_per_day=bench.requests_per_day,
    )


def break_even(
    bench: BenchmarkConfig,
    one_off: BreakEven,
    results: dict[str, SystemResult],
    tests: dict[str, PairedComparison] | None = None,
    judge_cannot_rank: str | None = None,
) -> BreakEven:
    """Requests (and days at benchmark.requests_per_day) after which distilling has paid for itself: the
    one-off cost (`one_off_cost`) over the per-request saving. `tests`: the paired tests of the tuned student
    against each system (comparisons' `student_tuned_vs`). `judge_cannot_rank`: why the judge's pass rates rank
    nothing (verdict.judge_cannot_rank), when they do not: a saving then rests on nothing, and none is stated."""

    def against(baseline: str) -> Payback:
        tuned = results[names.STUDENT_TUNED].cost_per_1k_requests
        saving = (results[baseline].cost_per_1k_requests - tuned) / 1000
        test = (tests or {}).get(baseline)
        p_value = test.p_value if test is not None else None
        skipped = (
            (f"the judge cannot rank the answers ({judge_cannot_rank})" if judge_cannot_rank else None)
            or why_no_break_even(results, baseline, bench.verdict, p_value)
            or saving_within_noise(tuned, results[baseline].cost_per_1k_requests, bench.verdict)
        )
        requests = one_off.one_off_usd / saving if saving > 0 and skipped is None else None
        return Payback(
            saving_per_1k_requests_usd=saving * 1000,
            requests=requests,
            days=requests / bench.requests_per_day if requests is not None else None,
            skipped=skipped,
        )

    even = structs.replace(one_off, **structs.asdict(against(names.TEACHER)))
    if names.STUDENT_PROMPTED in results:
        # The "try prompting first" baseline: what fine-tuning saves over serving the untuned student its long prompt.
        even.vs_prompted = against(names.STUDENT_PROMPTED)
    return even


def teacher_tokens(teacher_outputs: Path) -> tuple[int, int]:
    """(prompt, output) tokens the teacher's server billed for generate: its reported usage per row, else the
    counts measured here."""
    prompt = output = 0
    if not teacher_outputs.is_file():
        return 0, 0
    for row in read_jsonl(teacher_outputs):
        usage = row.get("usage") or {}
        prompt += usage.get("prompt_tokens", row.get("prompt_tokens") or 0)
        output += usage.get("completion_tokens", sum(c.get("output_tokens") or 0 for c in row.get("completions", [])))
    return prompt, output
