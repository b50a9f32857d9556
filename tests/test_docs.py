"""Docs that cannot rot: README and every page under docs/ are checked against the code.

- every config file they name exists and loads, through the project's own loader;
- every `distill` command line in a code block parses against the CLI parser, and its `key=value` overrides name
  real config keys: they are loaded as `distill` loads them, so an unknown key fails as it would there;
- every relative link resolves, to a file or to a reference page the site generates;
- every config field has a description, which the generated reference shows.

Each check also runs once on a broken input, to show it would fail. `mkdocs build --strict` (scripts/test.sh) adds
the anchors and the navigation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
from functools import cache
from pathlib import Path
from types import ModuleType

from pydantic import Field

from pipeline.cli import build_parser
from pipeline.config import ConfigError, load_config
from pipeline.config.base import StrictModel
from pipeline.tasks import TaskError, build_task

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

CONFIG_NAMED = re.compile(r"configs/[\w./-]+\.ya?ml")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(\s*)(```|~~~)")


@cache
def reference() -> ModuleType:
    """scripts/docs_reference.py, the mkdocs hook that generates the reference pages."""
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "scripts" / "docs_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split_code(text: str) -> tuple[list[str], str]:
    """The fenced code blocks of a Markdown text (dedented to their fence), and the prose outside them."""
    blocks: list[str] = []
    prose: list[str] = []
    inside: tuple[str, str] | None = None  # the open fence's indent and marker
    for line in text.splitlines():
        fence = FENCE.match(line)
        if inside is None and fence:
            inside = (fence.group(1), fence.group(2))
            blocks.append("")
        elif inside is not None and fence and line.strip() == inside[1]:
            inside = None
        elif inside is not None:
            blocks[-1] += line.removeprefix(inside[0]) + "\n"
        else:
            prose.append(line)
    return blocks, "\n".join(prose)


def distill_commands(text: str) -> list[str]:
    """Every `distill ...` command line in the text's code blocks, backslash continuations joined."""
    commands = []
    for block in split_code(text)[0]:
        for line in block.replace("\\\n", " ").splitlines():
            words = line.split(maxsplit=1)
            if words and Path(words[0]).name == "distill":
                commands.append(line.strip())
    return commands


def command_problems(command: str, root: Path = ROOT) -> list[str]:
    """Why a `distill` command line would not run as written: an unknown subcommand or flag, a config that does not
    load, an override naming no config key or a task parameter the task does not take."""
    argv = shlex.split(command, comments=True)[1:]
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            args = build_parser().parse_args(argv)
    except SystemExit as exc:  # `--help` exits 0
        return [] if exc.code == 0 else [f"{command}: {err.getvalue().strip().splitlines()[-1]}"]
    if getattr(args, "config", None) is None:
        return []
    try:
        config = load_config(root / args.config, args.overrides)
        build_task(config.task.name, config.task.params, config.seed, root)
    except (ConfigError, TaskError) as exc:
        return [f"{command}: {exc}"]
    return []


def config_problems(text: str, root: Path = ROOT) -> list[str]:
    """Config files the text names that are missing or do not load (accelerate's own configs need only exist)."""
    problems = []
    for name in sorted(set(CONFIG_NAMED.findall(text))):
        path = root / name
        if not path.is_file():
            problems.append(f"{name}: no such file")
        elif not name.startswith("configs/accelerate/"):
            try:
                load_config(path)
            except ConfigError as exc:
                problems.append(f"{name}: {exc}")
    return problems


def relative_links(text: str) -> list[str]:
    """The relative link targets of a Markdown text, outside code blocks and code spans."""
    prose = re.sub(r"`[^`\n]*`", "", split_code(text)[1])
    return [t for t in LINK.findall(prose) if "://" not in t and not t.startswith(("#", "mailto:"))]


def broken_links(page: Path, docs: Path = ROOT / "docs") -> list[str]:
    """The page's relative links whose target is neither a file nor a page the site generates."""
    generated = {(docs / name).resolve() for name in reference().GENERATED}
    broken = []
    for target in relative_links(page.read_text()):
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists() and path not in generated:
            broken.append(target)
    return broken


# --- The real docs ---------------------------------------------------------------------------------------------


def test_every_config_the_docs_name_exists_and_loads():
    named = set()
    problems = []
    for page in PAGES:
        named |= set(CONFIG_NAMED.findall(page.read_text()))
        problems += [f"{page.relative_to(ROOT)}: {p}" for p in config_problems(page.read_text())]
    assert not problems, "\n".join(problems)
    assert len(named) >= 6, f"the check saw only {sorted(named)}"


def test_every_distill_command_in_a_code_block_parses_with_real_keys():
    seen = 0
    problems = []
    for page in PAGES:
        for command in distill_commands(page.read_text()):
            seen += 1
            problems += [f"{page.relative_to(ROOT)}: {problem}" for problem in command_problems(command)]
    assert not problems, "\n".join(problems)
    assert seen >= 20, f"the check found {seen} commands: too few to be looking"


def test_every_relative_link_resolves():
    problems = [f"{page.relative_to(ROOT)}: {target}" for page in PAGES for target in broken_links(page)]
    assert not problems, "broken links:\n" + "\n".join(problems)
    assert sum(len(relative_links(page.read_text())) for page in PAGES) >= 50


def test_every_config_field_has_a_description():
    missing = reference().every_undescribed_field()
    assert not missing, "fields without Field(description=...): " + ", ".join(missing)


# --- Each check on a broken input ------------------------------------------------------------------------------


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "docs" / "reference").mkdir(parents=True)
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "[here](page.md) [web](https://example.org/x.md) [anchor](#top) [generated](reference/config.md#train)\n"
        "[gone](missing.md#part) `[code](ignored.md)`\n```\n[block](ignored-too.md)\n```\n"
    )
    assert broken_links(page, tmp_path / "docs") == ["missing.md#part"]


def test_an_unknown_key_flag_or_command_is_found():
    config = "--config configs/smollm2_support.yaml"
    assert command_problems(f"distill train {config} train.learning_rate=5e-4 --force") == []
    assert command_problems("distill compare runs/a runs/b") == []
    [unknown_key] = command_problems(f"distill train {config} train.learnig_rate=5e-4")
    assert "train.learnig_rate: unknown key" in unknown_key
    [bad_param] = command_problems("distill run --config configs/smollm2_sentiment.yaml task.params.text_colum=x")
    assert "task.params.text_colum" in bad_param
    [unknown_flag] = command_problems(f"distill train {config} --forse")
    assert "--forse" in unknown_flag
    [unknown_command] = command_problems(f"distill trian {config}")
    assert "trian" in unknown_command


def test_a_missing_or_broken_config_is_found(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "bad.yaml").write_text(
        (ROOT / "configs" / "smollm2_support.yaml").read_text() + "nope: 1\n"
    )
    text = "run `configs/bad.yaml`, or configs/missing.yaml"
    assert config_problems(text, tmp_path) == [
        "configs/bad.yaml: nope: unknown key",
        "configs/missing.yaml: no such file",
    ]
    assert command_problems("distill run --config configs/missing.yaml", tmp_path) == [
        f"distill run --config configs/missing.yaml: config file not found: {tmp_path / 'configs' / 'missing.yaml'}"
    ]


def test_a_field_without_a_description_is_found():
    class Section(StrictModel):
        described: int = Field(1, description="Has one.")
        bare: int = 2

    class Root(StrictModel):
        section: Section = Field(default_factory=Section, description="A section.")
        items: list[Section] = Field(default_factory=list)

    assert reference().undescribed_fields(Root) == ["items (Root)", "section.bare (Section)"]


def test_code_blocks_and_commands_are_read_as_written():
    text = "```bash\ndistill run --config c.yaml \\\n    seed=3   # a comment\n```\n  ```yaml\n  distill: no\n  ```\n"
    assert split_code(text)[0] == ["distill run --config c.yaml \\\n    seed=3   # a comment\n", "distill: no\n"]
    assert distill_commands(text) == ["distill run --config c.yaml      seed=3   # a comment"]
