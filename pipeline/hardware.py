"""What the accelerator can do at most: its dense bf16 peak and memory bandwidth, from the vendor's datasheet,
keyed by the name CUDA reports. One table for training MFU (and for the benchmark's hardware profiles).

Figures are dense (no structured sparsity), SXM parts unless the name says PCIe; sources:
- H100 SXM / PCIe: NVIDIA H100 Tensor Core GPU datasheet (bf16 989 / 756 TFLOP/s, 3.35 / 2.0 TB/s).
- H200: NVIDIA H200 datasheet (bf16 989 TFLOP/s, 4.8 TB/s).
- A100 80GB / 40GB: NVIDIA A100 datasheet (bf16 312 TFLOP/s; 2.039 / 1.555 TB/s).
- L4 / L40S: NVIDIA L4 and L40S datasheets (bf16 242 / 733 TFLOP/s with sparsity, so 121 / 362 dense; 300 / 864 GB/s).
- A10G (AWS g5): NVIDIA publishes no A10G sheet; the A10 datasheet's figures (bf16 125 TFLOP/s dense, 600 GB/s).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_tflops: float  # dense bf16 tensor-core peak
    memory_gbps: float  # memory bandwidth, GB/s


# Matched in order against the lower-cased CUDA device name (e.g. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"):
# every word of the key must occur in it, the more specific keys first.
ACCELERATORS: tuple[tuple[str, Accelerator], ...] = (
    ("h200", Accelerator("h200", 989.0, 4800.0)),
    ("h100 pcie", Accelerator("h100-pcie", 756.0, 2000.0)),
    ("h100", Accelerator("h100-sxm", 989.0, 3350.0)),
    ("a100 40gb", Accelerator("a100-40gb", 312.0, 1555.0)),
    ("a100", Accelerator("a100-80gb", 312.0, 2039.0)),
    ("l40s", Accelerator("l40s", 362.0, 864.0)),
    ("l4", Accelerator("l4", 121.0, 300.0)),
    ("a10g", Accelerator("a10g", 125.0, 600.0)),
)


def accelerator_for(device_name: str) -> Accelerator | None:
    """The datasheet entry for a CUDA device name (`torch.cuda.get_device_name()`), None when unknown."""
    words = set(device_name.lower().replace("-", " ").split())
    for key, accelerator in ACCELERATORS:
        if set(key.split()) <= words:
            return accelerator
    return None


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
