"""Stage 3, train: supervised fine-tuning of the student with LoRA (TRL SFTTrainer + PEFT)."""

from pipeline.train.stage import run_train

__all__ = ["run_train"]
