"""Stage 3, train: supervised fine-tuning of the student with LoRA (TRL SFTTrainer + PEFT), or logit
distillation (`train.objective: kd`).

Reads `filter/train.jsonl` and `val.jsonl` (and, for KD, the teacher's logprobs in
`generate/teacher_outputs.jsonl`). Writes `train/adapter/` (none for `train.method: full`), `train/merged/`
(the weights vLLM serves), `train_metrics.json`, `data_keys.json` and `manifest.json`.
"""

from pipeline.train.stage import run_train

__all__ = ["run_train"]
