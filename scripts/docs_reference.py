"""The documentation site's reference pages, generated from the code each time the site is built (an mkdocs hook).

    .venv/bin/mkdocs build --strict --site-dir "$(mktemp -d)"   # mkdocs.yml names this file under `hooks:`
    .venv/bin/python scripts/docs_reference.py config            # print one page: config, cli or report-json

One home per fact: the config keys come from the pydantic models in pipeline/config/ (each field's description),
the command line from the argparse parser in pipeline/cli.py, and report.json from the msgspec structs in
pipeline/benchmark/results.py (each field's comment). No generated page is committed, so none can drift.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import inspect
import io
import json
import operator
import sys
import tokenize
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import annotated_types
import msgspec
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent


def this_checkout_first() -> None:
    """Document the `pipeline` beside this file, not an installed copy. mkdocs puts sys.path back after loading a
    hook, so this runs when the pages are made."""
    if sys.path[:1] != [str(ROOT)]:
        sys.path.insert(0, str(ROOT))


def anchor(path: str) -> str:
    """The heading id of a section: `teacher.engine` -> `teacher-engine` (a dot would read as a class name)."""
    return "".join(c if c.isalnum() or c == "_" else "-" for c in path).strip("-").replace("--", "-")


def cell(text: str) -> str:
    """Text that stays in its table cell, where `<name>` outside a code span would read as an HTML tag."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    return "`".join(part if i % 2 else part.replace("<", "&lt;") for i, part in enumerate(parts))


def own_doc(cls: type) -> str:
    """The class's own docstring, not one inherited from a base model."""
    doc = cls.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if doc else ""


# --- The config keys, from the pydantic models -------------------------------------------------------------


def nested_model(annotation: Any) -> tuple[type[BaseModel], str] | None:
    """The config section a field holds, and how its key reads below it: "" (`x.key`), "[]" (a list of them) or
    ".<name>" (a mapping of them)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation, ""
    if origin is list and args and inspect.isclass(args[0]) and issubclass(args[0], BaseModel):
        return args[0], "[]"
    if origin is dict and len(args) == 2 and inspect.isclass(args[1]) and issubclass(args[1], BaseModel):
        return args[1], ".<name>"
    if origin in (typing.Union, types.UnionType):
        found = [nested_model(arg) for arg in args if arg is not type(None)]
        return next((f for f in found if f), None)
    return None


def config_sections(model: type[BaseModel], path: str = "") -> Iterator[tuple[str, type[BaseModel]]]:
    """Every section of the config, depth first in the order of the fields, each model class once: at the first
    key that holds it (`teacher.engine`); later keys holding it (`benchmark.engine`) point there."""
    seen: set[type[BaseModel]] = set()

    def walk(model: type[BaseModel], path: str) -> Iterator[tuple[str, type[BaseModel]]]:
        seen.add(model)
        yield path, model
        for name, field in model.model_fields.items():
            found = nested_model(field.annotation)
            if found and found[0] not in seen:
                yield from walk(found[0], f"{path}.{field.alias or name}".lstrip(".") + found[1])

    yield from walk(model, path)


def task_params() -> dict[str, type[BaseModel]]:
    """Each registered task's own `task.params` model, by task name."""
    from pipeline.tasks import TASKS

    found = {}
    for name, target in TASKS.items():
        module, _, cls = target.partition(":")
        found[name] = getattr(importlib.import_module(module), cls).Params
    return found


def undescribed_fields(model: type[BaseModel], path: str = "") -> list[str]:
    """The keys of every section below `model` whose field has no description: each must have one."""
    return [
        f"{at}.{field.alias or name}".lstrip(".") + f" ({cls.__name__})"
        for at, cls in config_sections(model, path)
        for name, field in cls.model_fields.items()
        if not (field.description or "").strip()
    ]


def every_undescribed_field() -> list[str]:
    """Every config key without a description: the experiment's, and each task's `task.params`."""
    from pipeline.config import ExperimentConfig

    missing = undescribed_fields(ExperimentConfig)
    for params in task_params().values():
        missing += undescribed_fields(params, "task.params")
    return missing


def type_text(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if origin is Literal:
        return " \\| ".join(f'"{arg}"' for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_text(arg) for arg in args)
    if origin is list:
        return f"list of {type_text(args[0])}"
    if origin is dict:
        return "mapping" if args[1] is Any else f"mapping of {type_text(args[0])} to {type_text(args[1])}"
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


BOUNDS = ((annotated_types.Ge, "ge", ">="), (annotated_types.Gt, "gt", ">"), (annotated_types.Le, "le", "<="),
          (annotated_types.Lt, "lt", "<"))  # fmt: skip


def bounds_text(metadata: list[Any]) -> str:
    found = [f"{sign} {getattr(m, attr)}" for m in metadata for kind, attr, sign in BOUNDS if isinstance(m, kind)]
    found += [f"matches `{m.pattern}`" for m in metadata if getattr(m, "pattern", None)]
    return ", ".join(found)


def default_text(value: Any) -> str:
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "see its section"
    if isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
        return ", ".join(f"`{getattr(v, 'name', type(v).__name__)}`" for v in value)
    if isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
        return ", ".join(f"`{key}`" for key in value)
    return f"`{value}`" if isinstance(value, str) else f"`{json.dumps(value)}`"


def config_table(path: str, cls: type[BaseModel], first_at: dict[type[BaseModel], str]) -> list[str]:
    """A section's table: each key with its type and bounds, default and description."""
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        key = f"{path}.{field.alias or name}".lstrip(".")
        kind = type_text(field.annotation)
        found = nested_model(field.annotation)
        if found:
            target = first_at[found[0]]
            kind = kind.replace("section", f"[section](#{anchor(target)})", 1)
            if target != key + found[1]:
                kind += f", as `{target}`"
        if bounds := bounds_text(field.metadata):
            kind += f", {bounds}"
        default = default_text(field.get_default(call_default_factory=True))
        lines.append(f"| `{key}` | {kind} | {default} | {cell(field.description or '')} |")
    return lines + [""]


def config_page() -> str:
    from pipeline.config import ExperimentConfig
    from pipeline.config.experiment import RETIRED_KEYS

    missing = every_undescribed_field()
    if missing:  # the build fails, as the test does
        raise ValueError(f"config fields without a description: {', '.join(missing)}")
    first_at = {cls: path for path, cls in config_sections(ExperimentConfig)}
    lines = [
        "# Config reference",
        "",
        "Every key of an experiment YAML, generated from the pydantic models in `pipeline/config/` when the site is "
        "built. A key's description is its `Field(description=...)` in the code.",
        "",
        "Any key can be set on the command line after the command, dotted, as `key=value`; values parse as YAML. "
        "A config with an unknown key or a wrong type stops with one line naming the key, and exit code 2.",
        "",
    ]
    for path, cls in config_sections(ExperimentConfig):
        lines += [f"## `{path}` {{#{anchor(path)}}}" if path else "## Top level {#top-level}", ""]
        if own_doc(cls):
            lines += [own_doc(cls), ""]
        lines += config_table(path, cls, first_at)
        if path == "task":  # each task's own parameters, validated when the task is built
            for name, params in task_params().items():
                lines += [f"### `task.params` of `{name}` {{#task-params-{name}}}", ""]
                lines += [own_doc(params), ""] if own_doc(params) else []
                lines += config_table("task.params", params, {})
    lines += ["## Retired keys", "", "A config that still names one stops with this line.", ""]
    lines += ["| key | where it went |", "|---|---|"]
    lines += [f"| `{key}` | {cell(why)} |" for key, why in RETIRED_KEYS.items()]
    return "\n".join(lines) + "\n"


# --- The command line, from the argparse parser --------------------------------------------------------------


def argument_row(action: argparse.Action) -> str:
    if action.option_strings:
        name = ", ".join(f"`{o}`" for o in action.option_strings)
        if action.nargs != 0:
            name += f" `{action.metavar or action.dest.upper()}`"
    else:
        name = f"`{action.metavar or action.dest}`" + (" ..." if action.nargs in ("*", "+") else "")
    notes = []
    if action.required and action.nargs not in ("*", "?"):
        notes.append("required")
    if action.choices:
        notes.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
    if action.nargs == "*":
        notes.append("optional, repeatable")
    if action.default not in (None, False, [], argparse.SUPPRESS):
        notes.append(f"default `{action.default}`")
    if action.type not in (None, str):
        notes.append(getattr(action.type, "__name__", str(action.type)))
    return f"| {name} | {cell(action.help or '')} | {cell('; '.join(notes))} |"


def cli_page() -> str:
    from pipeline.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    lines = [
        "# CLI reference",
        "",
        "The `distill` command, generated from the argparse parser in `pipeline/cli.py` when the site is built. "
        "`distill <command> --help` prints the same.",
        "",
        "```text",
        (parser.description or "").strip(),
        "```",
        "",
    ]
    for name, sub in commands.choices.items():
        lines += [f"## `distill {name}` {{#{anchor(name)}}}", "", f"{helps.get(name, '').capitalize()}.", ""]
        usage = sub.format_usage().removeprefix("usage: ").strip()
        lines += ["```text", usage, "```", "", "| argument | what it does | notes |", "|---|---|---|"]
        lines += [argument_row(a) for a in sub._actions if not isinstance(a, argparse._HelpAction)]
        lines.append("")
    return "\n".join(lines) + "\n"


# --- report.json, from the msgspec structs -------------------------------------------------------------------


def source_comments(path: Path) -> tuple[dict[int, str], dict[int, str]]:
    """A module's comments by line: those after code on their line, and those on a line of their own."""
    trailing: dict[int, str] = {}
    alone: dict[int, str] = {}
    last_code_line = 0
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            (trailing if token.start[0] == last_code_line else alone)[token.start[0]] = text
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            last_code_line = token.end[0]
    return trailing, alone


def field_lines(path: Path) -> dict[tuple[str, str], int]:
    """(class, field) -> the line a field is declared on: a struct's annotated fields, a plain class's `self.x =`."""
    found: dict[tuple[str, str], int] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in ast.walk(node):
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                found.setdefault((node.name, item.target.id), item.lineno)
            elif isinstance(item, ast.Assign) and isinstance(item.targets[0], ast.Attribute):
                found.setdefault((node.name, item.targets[0].attr), item.lineno)
    return found


class Documented:
    """A struct's fields with the comments its module gives them: on the field's line (its description), and the
    comment lines just above a field (a note on the group of fields it starts)."""

    def __init__(self, module: types.ModuleType) -> None:
        self.path = Path(inspect.getfile(module))
        self.trailing, self.alone = source_comments(self.path)
        self.lines = field_lines(self.path)

    def comments(self, cls: type, name: str) -> tuple[str, str]:
        line = next((self.lines[(c.__name__, name)] for c in cls.__mro__ if (c.__name__, name) in self.lines), 0)
        above = []
        while line - 1 - len(above) in self.alone:
            above.insert(0, self.alone[line - 1 - len(above)])
        return self.trailing.get(line, ""), " ".join(above)


def unwrap(kind: Any) -> tuple[Any, bool]:
    """A field's type without msgspec's UNSET, and whether the field may be absent."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(kind) if arg is not msgspec.UnsetType]
        if len(args) < len(typing.get_args(kind)):
            return functools.reduce(operator.or_, args), True
    return kind, False


def struct_in(kind: Any) -> tuple[type, str] | None:
    """The struct (or the report's `Forgetting`) a field holds, and how its key reads below it."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if inspect.isclass(kind) and (issubclass(kind, msgspec.Struct) or hasattr(kind, "from_builtins")):
        return kind, ""
    if origin is list and args:
        found = struct_in(args[0])
        return (found[0], "[]" + found[1]) if found else None
    if origin is dict and len(args) == 2:
        found = struct_in(args[1])
        return (found[0], ".<name>" + found[1]) if found else None
    if origin in (typing.Union, types.UnionType):
        return next((f for f in (struct_in(arg) for arg in args if arg is not type(None)) if f), None)
    return None


def report_type_text(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is type(None):
        return "null"
    if kind is Any:
        return "any"
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(report_type_text(arg) for arg in args)
    if origin is list:
        return f"list of {report_type_text(args[0])}"
    if origin is dict:
        return f"mapping of {report_type_text(args[0])} to {report_type_text(args[1])}"
    if struct_in(kind):
        return "object"
    return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(kind.__name__, kind.__name__)


# `Forgetting` writes each probed system's summary under the system's name, beside its other keys.
SPREAD = {"systems": "<system>"}
# What a mapping's keys are, where they are not a system's name.
KEYS_NAMED = {"load": "<level>", "reference_agreement": "<metric>"}


def struct_fields(cls: type) -> list[tuple[str, str, Any]]:
    """(key in report.json, name in the code, type) of a struct's fields, or of the plain `Forgetting`'s."""
    if issubclass(cls, msgspec.Struct):
        return [(f.encode_name, f.name, f.type) for f in msgspec.structs.fields(cls)]
    hints = typing.get_type_hints(cls.__init__, vars(sys.modules[cls.__module__]))
    fields = []
    for name, kind in hints.items():
        if name in SPREAD:  # a mapping of them, written as keys of this object
            fields.append((SPREAD[name], name, struct_in(kind)[0]))
        elif name != "return":
            fields.append((name, name, kind))
    return fields


def report_sections(root: type) -> Iterator[tuple[str, type]]:
    """Every object of report.json, depth first, each struct once: at the first key that holds it."""
    seen: set[type] = set()

    def walk(cls: type, path: str) -> Iterator[tuple[str, type]]:
        seen.add(cls)
        yield path, cls
        for key, _, kind in struct_fields(cls):
            found = struct_in(unwrap(kind)[0])
            if found and found[0] not in seen:
                below = found[1].replace(".<name>", f".{KEYS_NAMED[key]}", 1) if key in KEYS_NAMED else found[1]
                yield from walk(found[0], f"{path}.{key}".lstrip(".") + below)

    yield from walk(root, "")


def report_page() -> str:
    from pipeline.benchmark import results

    documented = Documented(results)
    first_at = {cls: path for path, cls in report_sections(results.Report)}
    lines = [
        "# report.json reference",
        "",
        f"`benchmark/report.json` holds every figure the benchmark made. This is schema version "
        f"{results.REPORT_SCHEMA_VERSION} (`schema_version`), generated from the msgspec structs in "
        "`pipeline/benchmark/results.py` when the site is built; a field's description is its comment there.",
        "",
        "A field marked *may be absent* is missing from reports written before it existed, or where it does not "
        "apply to that system. `<name>` and `<system>` stand for a system's name, `<level>` for a concurrency level.",
        "",
    ]
    header = ["| key | type | description |", "|---|---|---|"]
    for path, cls in report_sections(results.Report):
        lines += [f"## `{path}` {{#{anchor(path)}}}" if path else "## Top level {#top-level}", ""]
        if own_doc(cls):
            lines += [own_doc(cls), ""]
        lines += header
        for key, name, kind in struct_fields(cls):
            trailing, above = documented.comments(cls, name)
            if not issubclass(cls, msgspec.Struct):  # a plain class's comments sit above each `self.x = x`
                trailing, above = trailing or above, ""
            if above and lines[-1] == header[1]:
                lines[-2:-2] = [above, ""]
            elif above:  # a comment above a group of fields opens a table of its own
                lines += ["", above, "", *header]
            bare, may_be_absent = unwrap(kind)
            text = report_type_text(bare)
            found = struct_in(bare)
            if found:
                text = text.replace("object", f"[object](#{anchor(first_at[found[0]])})", 1)
            if may_be_absent:
                text += ", *may be absent*"
            lines.append(f"| `{key}` | {text} | {cell(trailing)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


# --- The hook ------------------------------------------------------------------------------------------------

GENERATED: dict[str, Callable[[], str]] = {
    "reference/config.md": config_page,
    "reference/cli.md": cli_page,
    "reference/report-json.md": report_page,
}


def on_files(files: Any, config: Any) -> Any:
    """mkdocs: add the generated pages to the site, made from the code as it is now."""
    from mkdocs.structure.files import File

    this_checkout_first()
    for src_uri, make in GENERATED.items():
        files.append(File.generated(config, src_uri, content=make()))
    return files


def on_serve(server: Any, config: Any, builder: Any) -> Any:
    """`mkdocs serve`: rebuild when the code the pages come from changes."""
    for part in ("pipeline/config", "pipeline/cli.py", "pipeline/benchmark/results.py"):
        server.watch(str(ROOT / part))
    return server


if __name__ == "__main__":
    this_checkout_first()
    print(GENERATED[f"reference/{sys.argv[1] if len(sys.argv) > 1 else 'config'}.md"](), end="")
