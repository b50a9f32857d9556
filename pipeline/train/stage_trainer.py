"""What the stage adds to TRL's trainers, SFT and KD alike (`StageTrainer`, put before the TRL class in the bases):
less host work in every step, trained tokens counted without a host-device sync, and the callbacks and figures
that say how fast training ran. The measurements behind each: docs/measurements.md, "Training speed"."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline import hardware  # looked up at each call: tests stand a GPU's name in


class AttentionWithoutCudnn:
    """Trains with `scaled_dot_product_attention` kept off cuDNN on CUDA (`hardware.attention_without_cudnn`):
    unpacked batches are padded to their longest example, so nearly every step brings a new length, and cuDNN
    builds a plan for each (forward and backward): unpacked steps ran up to twice as fast without it on an H200
    (docs/measurements.md, "Each default, as it was measured")."""

    def train(self, *args: Any, **kwargs: Any) -> Any:
        with hardware.attention_without_cudnn(self.args.device.type):
            return super().train(*args, **kwargs)


@contextmanager
def heap_frozen() -> Iterator[None]:
    """Python's objects alive now (the model, the libraries: ~0.5 million) moved out of the garbage collector's
    reach until the block ends, so that its full collections scan only what training allocates: unfrozen, a full
    collection walked them all every hundred steps or so, a pause of a few host-bound steps, and under DDP one
    rank's pause stalls them all (docs/measurements.md, "The heap frozen while training"). Garbage is collected
    first; a caller's freeze is left as it was."""
    import gc

    frozen_before = gc.get_freeze_count() > 0
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        if not frozen_before:
            gc.unfreeze()


class HeapFrozen:
    """Trains inside `heap_frozen`."""

    def train(self, *args: Any, **kwargs: Any) -> Any:
        with heap_frozen():
            return super().train(*args, **kwargs)


class TokenCounter:
    """Counts the trained (non-padding) tokens of every rank, as TRL's `num_tokens`, without a host-device sync per
    step: the count stays on the device (a mask's sum) or in Python (a padding-free row's length) until the next
    log. TRL's own count, `int(...)` of a device tensor every step, stalled the CPU until the GPU caught up, so
    that the next batch was collated and sent while the GPU waited."""

    _uncounted: Any = None  # tokens of the training steps since the last log

    def count_tokens(self, inputs: dict[str, Any]) -> None:
        mask, positions = inputs.get("attention_mask"), inputs.get("position_ids")
        tokens = mask.sum() if mask is not None else positions.size(1)
        self._uncounted = tokens if self._uncounted is None else self._uncounted + tokens

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        import torch

        if self._uncounted is not None and self.model.training:  # an evaluation's log leaves them for the next
            uncounted, self._uncounted = self._uncounted, None
            if self.accelerator.num_processes > 1:  # every rank logs at the same steps: the gather is collective
                uncounted = self.accelerator.gather(torch.as_tensor(uncounted, device=self.accelerator.device)).sum()
            self._total_train_tokens += int(uncounted)
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        super().log(logs, start_time)


class ParametersCountedOnce:
    """Transformers' per-step FLOPs estimate (`total_flos`: 6 x input tokens x non-embedding parameters) with the
    parameters counted once: its `floating_point_ops` recounted them every step, walking every module and
    parameter of the model while the GPU waits."""

    _counted: tuple[int, int] | None = None  # (id of the model, its non-embedding parameters)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._counted is None or self._counted[0] != id(self.model):
            self._counted = (id(self.model), self.model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[main_input].numel() * self._counted[1]


@contextmanager
def housekeeping_on(model: Any, trained: list[Any]) -> Iterator[None]:
    """The model's `train()` a no-op while it is already in training mode, and its `zero_grad()` over the `trained`
    weights only, until exit (instance attributes over the class's methods). Transformers' loop calls both every step
    over the whole model. Mode changes go through the model itself (the trainer's `model.eval()` for an evaluation,
    then `model.train()`, which walks every module again), so a module left in eval mode below it is not expected."""
    model_class = type(model)

    def train(mode: bool = True) -> Any:
        return model if mode and model.training else model_class.train(model, mode)

    def zero_grad(set_to_none: bool = True) -> None:
        for parameter in trained:
            if parameter.grad is None:
                continue
            if set_to_none:
                parameter.grad = None
            else:
                parameter.grad.detach_().zero_()

    model.train, model.zero_grad = train, zero_grad
    try:
        yield
    finally:
        del model.train, model.zero_grad


class HousekeepingOnTrainable:
    """Transformers' per-step housekeeping over the weights that train, not the whole model: each step it put every
    module in training mode, set every parameter's gradient to None and clipped the gradient norm through all of
    them. An unpacked GPU step of short examples is bound by the host, so it paid all of that (docs/measurements.md,
    "Each default, as it was measured")."""

    _trained: tuple[int, list[Any]] | None = None  # (id of the model, its parameters that train)

    def trained_parameters(self) -> list[Any]:
        if self._trained is None or self._trained[0] != id(self.model):
            self._trained = (id(self.model), [p for p in self.model.parameters() if p.requires_grad])
        return self._trained[1]

    def train(self, *args: Any, **kwargs: Any) -> Any:
        with housekeeping_on(self.model, self.trained_parameters()):
            return super().train(*args, **kwargs)

    def _clip_grad_norm(self, model: Any) -> Any:
        if self.accelerator.distributed_type not in ("NO", "MULTI_CPU", "MULTI_GPU"):  # sharded gradients
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(self.trained_parameters(), self.args.max_grad_norm)


class StageTrainer(AttentionWithoutCudnn, HeapFrozen, HousekeepingOnTrainable, TokenCounter, ParametersCountedOnce):
    """What the stage adds to TRL's trainer, for SFT and KD alike: put before `SFTTrainer` in a class's bases."""


def model_parameters(model: Any) -> int:
    """Parameters a token is multiplied by (4-bit weights counted unpacked; LoRA's included): all of them but an
    input embedding table that is not also the head (one row looked up per token, no FLOPs)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        total = int(model.get_nb_trainable_parameters()[1])
    else:
        total = sum(p.numel() for p in model.parameters())
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embeddings is not None and head is not None and embeddings.weight is not head.weight:
        total -= embeddings.weight.numel()
    return total


def throughput_metrics(trainer: Any, runtime_s: float, full: bool) -> dict[str, Any]:
    """Training tokens (prompt and completion, padding excluded) per second and, on a CUDA device whose peak the
    datasheet table knows, model FLOPs utilisation of each GPU against its dense bf16 peak (pipeline/hardware.py).
    The token count is every rank's (TRL gathers it), so a GPU's share is 1/world_size of it."""
    counts = [entry["num_tokens"] for entry in trainer.state.log_history if "num_tokens" in entry]
    tokens = int(counts[-1]) if counts else 0
    per_s = tokens / runtime_s if runtime_s > 0 else 0.0
    metrics: dict[str, Any] = {"train_tokens": tokens, "train_tokens_per_s": round(per_s, 1)}
    cuda = hardware.cuda_accelerator() if not trainer.args.use_cpu else None
    if cuda:
        name, accelerator = cuda
        metrics["accelerator"] = name
        if accelerator and accelerator.peak_tflops:  # an A10G has no published peak to measure against
            per_gpu = per_s / trainer.args.world_size
            metrics["peak_tflops"] = accelerator.peak_tflops
            utilisation = hardware.mfu(per_gpu, model_parameters(trainer.model), full, accelerator.peak_tflops)
            metrics["mfu"] = round(utilisation, 4)
    return metrics


def log_the_last_step_callback():
    """Logs the last step's loss whatever `logging_steps` is (with `logging_first_step`, the first one too): a run
    shorter than `logging_steps` used to record no loss at all (`loss None -> None`)."""
    from transformers import TrainerCallback

    class LogTheLastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_log = True

    return LogTheLastStep()


def throughput_callback():
    """Adds training tokens/s (since the previous log) and, on CUDA, peak GPU memory to every log entry."""
    import time

    import torch
    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        last: tuple[float, float] | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "num_tokens" not in logs:
                return
            now, tokens = time.perf_counter(), float(logs["num_tokens"])
            added = {}
            if self.last is not None and now > self.last[0] and tokens >= self.last[1]:
                added["tokens_per_s"] = (tokens - self.last[1]) / (now - self.last[0])
            self.last = (now, tokens)
            if torch.cuda.is_available():
                added["gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            logs.update(added)  # what the W&B callback, next in line, logs
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(added)  # the trainer copied `logs` there already

    return Throughput()
