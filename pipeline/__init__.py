"""Distillation pipeline: teacher generation -> filtering -> LoRA SFT -> benchmark."""

__version__ = "0.1.0"
