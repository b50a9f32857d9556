"""What the machine can do at most, and what its hour costs: one table for training MFU and for the benchmark's
hardware profiles (prices, roofline shares), plus detection of the machine a run is on and a CPU probe.

GPU limits are the dense bf16 peak and the memory bandwidth from the vendor's datasheet, keyed by the name CUDA
reports; a CPU's are measured (`probe_cpu`: fp32 matmul and a memory read), since no datasheet describes the
slice of a machine a job gets.

Figures are dense bf16 (no structured sparsity: where a datasheet prints only the sparse figure, half of it) and
the memory bandwidth, from NVIDIA's datasheets:
- H100 SXM / NVL: NVIDIA H100 Tensor Core GPU datasheet (1,979 / 1,671 TFLOP/s with sparsity, so 989 / 835;
  3.35 / 3.9 TB/s). H100 PCIe: an earlier edition of it, with a PCIe column (1,513 with sparsity, so 756; 2.0 TB/s).
- H200 SXM / NVL: NVIDIA H200 datasheet (1,979 / 1,671 with sparsity, so 989 / 835; 4.8 TB/s both).
- A100: NVIDIA A100 datasheet (312 TFLOP/s every form; 80GB SXM 2,039, 80GB PCIe 1,935, 40GB SXM and PCIe
  1,555 GB/s).
- L4 / L40S / L40: their datasheets (L4 242 with sparsity, so 121; L40S 362.05 and L40 181.05 dense as printed;
  300 / 864 / 864 GB/s).
- A10: NVIDIA A10 datasheet (125 TFLOP/s dense, 600 GB/s).
- A10G (AWS g5): NVIDIA publishes no A10G datasheet, and it is not the A10 (less tensor throughput: Baseten's
  "NVIDIA A10 vs A10G for ML model inference", no vendor figure), so its compute peak is unset (no MFU, no
  compute share); its 600 GB/s is the A10's, the same 24 GB of GDDR6 (that comparison too).
Prices are indicative on-demand $/hour for one GPU (cloud list prices, late 2026; a10g is AWS's g5.xlarge): set
your own in `benchmark.hardware_profiles`. Those of h100-nvl, h200-nvl, a100-80gb-pcie, l40 and a10 are placed
among the others by their limits (below the SXM or L40S sibling, the A10 beside the L4), not read off a price
list; a test keeps a part at least as fast on both limits from costing less.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class Accelerator:
    name: str  # also its profile's key in benchmark.hardware_profiles
    peak_tflops: float | None  # dense bf16 tensor-core peak; None where no figure is published (A10G)
    memory_gbps: float  # memory bandwidth, GB/s
    usd_per_hour: float = 0.0  # indicative on-demand price of one


# Matched in order against the words of the CUDA device name, lower-cased, hyphens as spaces (e.g. "NVIDIA H100
# NVL", "NVIDIA A100-SXM4-40GB"): the first key whose words all occur in it wins, so a variant's key comes before
# its family's (a test checks that none is hidden). Whole words: "a10" is not "a10g", nor "h200" "gh200".
ACCELERATORS: tuple[tuple[str, Accelerator], ...] = (
    ("h200 nvl", Accelerator("h200-nvl", 835.0, 4800.0, 3.20)),
    ("h200", Accelerator("h200", 989.0, 4800.0, 3.50)),  # SXM
    ("h100 nvl", Accelerator("h100-nvl", 835.0, 3900.0, 2.80)),
    ("h100 pcie", Accelerator("h100-pcie", 756.0, 2000.0, 2.50)),
    ("h100", Accelerator("h100", 989.0, 3350.0, 3.00)),  # SXM
    ("a100 40gb", Accelerator("a100-40gb", 312.0, 1555.0, 1.30)),  # SXM4 and PCIe alike
    ("a100 80gb pcie", Accelerator("a100-80gb-pcie", 312.0, 1935.0, 1.60)),
    ("a100", Accelerator("a100-80gb", 312.0, 2039.0, 1.80)),  # SXM4
    ("l40s", Accelerator("l40s", 362.0, 864.0, 1.20)),
    ("l40", Accelerator("l40", 181.0, 864.0, 1.00)),
    ("l4", Accelerator("l4", 121.0, 300.0, 0.70)),
    ("a10g", Accelerator("a10g", None, 600.0, 1.01)),
    ("a10", Accelerator("a10", 125.0, 600.0, 0.75)),
)
UNKNOWN_GPU = "unknown-gpu"  # a GPU the table lacks: priced as a placeholder, no limits, and the user is told
UNKNOWN_GPU_USD_PER_HOUR = 2.00
CPU_USD_PER_CORE_HOUR = 0.05  # cpu-2core: $0.10/hour


def cpu_profile_name(cores: int) -> str:
    return f"cpu-{cores}core"


def accelerator_for(device_name: str) -> Accelerator | None:
    """The datasheet entry for a CUDA device name (`torch.cuda.get_device_name()`), None when unknown."""
    words = set(device_name.lower().replace("-", " ").split())
    for key, accelerator in ACCELERATORS:
        if set(key.split()) <= words:
            return accelerator
    return None


def profile_key(device_name: str) -> str:
    """The key of `benchmark.hardware_profiles` a CUDA device is priced and judged by: its table entry's name, or
    unknown-gpu."""
    accelerator = accelerator_for(device_name)
    return accelerator.name if accelerator else UNKNOWN_GPU


def cuda_accelerator() -> tuple[str, Accelerator | None] | None:
    """This process's CUDA device name and its datasheet entry; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return name, accelerator_for(name)


def train_flops_per_token(parameters: int, full: bool) -> float:
    """Model FLOPs per trained token: forward 2N, backward 2N for the activation gradients, and 2N more for the
    weight gradients only when every weight trains (full fine-tuning); LoRA's own matrices are negligible."""
    return (6 if full else 4) * parameters


def mfu(tokens_per_s: float, parameters: int, full: bool, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the accelerator's dense peak."""
    return tokens_per_s * train_flops_per_token(parameters, full) / (peak_tflops * 1e12)


@dataclass(frozen=True)
class Machine:
    """The machine this process runs on: what it is called, how many devices, and its profile's key."""

    device: str  # "NVIDIA H100 80GB HBM3", or "CPU (2 cores)"
    count: int  # GPUs, or CPU cores
    profile: str  # a key of benchmark.hardware_profiles: the table's name, unknown-gpu, or cpu-<n>core
    gpu: bool


def detect_machine() -> Machine:
    """CUDA device name and count when there is a GPU, else the CPU cores this process may use."""
    cuda = cuda_accelerator()
    if cuda is not None:
        import torch

        name = cuda[0]
        return Machine(name, torch.cuda.device_count(), profile_key(name), True)
    cores = len(os.sched_getaffinity(0))
    return Machine(f"CPU ({cores} cores)", cores, cpu_profile_name(cores), False)


@cache
def probe_cpu() -> tuple[float, float]:
    """(peak TFLOP/s, memory GB/s) of this CPU as a job sees it, measured in about a second: the best of a few
    fp32 matmuls (the engines run fp32 on CPU) and of reads of an array far larger than the caches, as a decode
    step reads its weights. The array is written first: pages never written are the kernel's shared zero page,
    which reads from cache at twice the speed of memory (docs/measurements.md, "The CPU probe")."""
    import time

    import torch

    def best(run, repeats: int = 10) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool, allocator
    tflops = 2 * n**3 / best(lambda: a @ b) / 1e12
    weights = torch.ones(256 * 2**20 // 4)  # 256 MiB of fp32, written, beyond any L3 here (32 MiB)
    weights.sum()
    gbps = weights.numel() * 4 / best(weights.sum) / 1e9
    return round(tflops, 4), round(gbps, 1)


@contextmanager
def attention_without_cudnn(device_type: str) -> Iterator[None]:
    """On CUDA, `scaled_dot_product_attention` without PyTorch's cuDNN backend (flash, memory-efficient or math
    instead); elsewhere nothing changes. cuDNN attention, which PyTorch prefers on Hopper, builds an execution plan
    the first time it meets each sequence length, and a generated request meets a new key length at every decode
    step; training pays the same per new padded length (docs/measurements.md, "cuDNN attention on Hopper")."""
    if device_type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


def release_memory() -> None:
    """Free what a finished stage or engine left behind, for the next one in this process (`distill run`, the
    benchmark's engines one after another). A trainer and its model sit in reference cycles, freed only when the
    collector next runs (after the train stage: the whole model); on CUDA, PyTorch then keeps their
    blocks cached, and vLLM, which sizes itself from the GPU's free memory (`gpu_memory_utilization`), finds them
    taken."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")  # not imported: nothing of torch's to free
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
