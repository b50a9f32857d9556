"""The levers against forgetting, as the verdict names them: each recipe knob this run set, and what another run of
the task measured where it differs from this one in that knob alone (a one-lever comparison)."""

from __future__ import annotations

from typing import Any

from msgspec import UNSET

from pipeline.benchmark.results import ForgettingChange, OtherRun, Recipe, Report

# The recipe knobs a lever turns, each with the lever as the verdict names it.
_LEVERS = (
    ("replay_fraction", "mix general chats in (train.replay.fraction, "),
    ("learning_rate", "a lower train.learning_rate ("),
    ("num_train_epochs", "fewer train.num_train_epochs ("),
    ("lora_r", "a smaller train.lora.r ("),
)
# Every knob that tells two recipes apart: a run that differs from this one in one lever and nothing else shows
# what that lever did.
_RECIPE_KNOBS = (*(key for key, _ in _LEVERS), "replay_source", "prompt_style")


def _knob(recipe: Recipe, key: str) -> Any:
    """A recipe knob's value; None where the run did not record it (older runs recorded fewer)."""
    value = getattr(recipe, key)
    return None if value is UNSET else value


def levers_sentence(report: Report) -> str:
    """The knobs that move forgetting, as this run set them; where another run of this task differs from this one
    in that knob alone, what it measured there, and whether it forgot more or less than this run."""
    recipe = report.recipe
    if not recipe:
        return "train gentler (lower learning rate, fewer epochs, smaller rank) or mix general data in."
    runs = [r for r in report.other_runs if r.probe_change is not None]
    change = report.forgetting.change
    cited: set[str] = set()
    knobs = []
    for key, lever in _LEVERS:
        if _knob(recipe, key) is None:
            continue
        said = f"{lever}now {_knob(recipe, key):g}"
        if key == "replay_fraction" and (recipe.replay_rows or 0) < (recipe.replay_wanted or 0):
            said += f", which added {recipe.replay_rows} of the {recipe.replay_wanted} rows wanted: see DATASET.md"
        for run in runs:
            if _differs_in(recipe, run.recipe) == [key] and _knob(run.recipe, key) is not None:
                cited.add(run.run)
                said += f"; {_knob(run.recipe, key):g} in `{run.run}`: {_forgetting_said(run)}{_compared(run, change)}"
        knobs.append(said + ")")
    here = f"probe {change.accuracy:+.1%}, leakage {change.leakage_rate:+.1%}"
    text = f"the levers (this run: {here}): " + ", ".join(knobs) + "."
    rest = [r for r in runs if r.run not in cited]
    if rest:
        said = [f"`{r.run}` ({_recipe_said(r.recipe)}): {_forgetting_said(r)}" for r in rest]
        text += " This task's other runs: " + "; ".join(said) + "."
    return text


def _differs_in(recipe: Recipe, other: Recipe) -> list[str]:
    """The recipe knobs two runs set differently; a knob one run recorded and the other did not counts as set
    differently."""
    knobs = [k for k in _RECIPE_KNOBS if _knob(recipe, k) != _knob(other, k)]
    if not (recipe.replay_fraction and other.replay_fraction):
        knobs = [k for k in knobs if k != "replay_source"]  # where either run has no replay, its source is moot
    return knobs


def _compared(run: OtherRun, change: ForgettingChange) -> str:
    """', forgot less than this run' when both measures are no worse and one better; 'more' the reverse."""
    probe, leakage = run.probe_change - change.accuracy, run.leakage_change - change.leakage_rate
    if probe >= 0 and leakage <= 0 and (probe, leakage) != (0, 0):
        return ", forgot less than this run"
    if probe <= 0 and leakage >= 0 and (probe, leakage) != (0, 0):
        return ", forgot more than this run"
    return ""


def _recipe_said(recipe: Recipe) -> str:
    """'replay 0.1, prompt retrieved, lr 0.001, r 16, 2 epochs': the knobs a run recorded (older runs, fewer)."""
    said = []
    replay = _knob(recipe, "replay_fraction")
    if replay is not None:
        said.append(f"replay {replay:g}")
        if replay and _knob(recipe, "replay_rows") is not None:  # recorded since the rows were counted
            said[0] += f" ({recipe.replay_source}, {recipe.replay_rows} rows)"
    if _knob(recipe, "prompt_style"):
        said.append(f"prompt {recipe.prompt_style}")
    if _knob(recipe, "learning_rate") is not None:
        said.append(f"lr {recipe.learning_rate:g}")
    if _knob(recipe, "lora_r"):
        said.append(f"r {recipe.lora_r}")
    if _knob(recipe, "num_train_epochs"):
        said.append(f"{recipe.num_train_epochs:g} epochs")
    return ", ".join(said) or "recipe not recorded"


def _forgetting_said(run: OtherRun) -> str:
    accuracy = f", accuracy {run.tuned_accuracy:.1%}" if run.tuned_accuracy is not UNSET else ""
    return f"probe {run.probe_change:+.1%}, leakage {run.leakage_change:+.1%}{accuracy}"
