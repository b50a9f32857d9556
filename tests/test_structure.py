"""The house stays a stack: the imports of `pipeline/` form no circle, the four stage packages stand side by side
(none imports another), and what they share sits below them, importing no stage and nothing above the stages.

Every import counts, at the top of a module or inside a function, as does the package a submodule sits in: to
import `pipeline.engines.base` Python runs `pipeline/engines/__init__.py` first.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "pipeline"
STAGES = ("generate", "filter", "train", "benchmark")
ABOVE_THE_STAGES = ("cli", "status", "promote", "compare", "sweep")  # they run stages, so they may import them


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in ROOT.rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The pipeline modules `path` imports, with the packages a Python import runs on the way to them."""
    here = module_name(path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pipeline import hardware` imports the module pipeline.hardware; `from pipeline.x import y`, x.
            named = [f"{node.module}.{alias.name}" for alias in node.names]
            targets = [name if name in known else node.module for name in named]
        else:
            continue
        for target in targets:
            if not target.startswith("pipeline"):
                continue
            parts = target.split(".")
            for depth in range(1, len(parts) + 1):
                package = ".".join(parts[:depth])
                inside = here == package or here.startswith(package + ".")
                if package in known and package != "pipeline" and not inside:
                    found.add(package)
    found.discard(here)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def floor(module: str) -> str:
    part = module.split(".")[1] if "." in module else ""
    if part in STAGES:
        return part
    return "above" if part in ABOVE_THE_STAGES else "shared"


def test_the_imports_form_no_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_stage_imports_another_and_the_shared_floor_imports_no_stage():
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            here, there = floor(module), floor(target)
            if here == "shared" and there != "shared":
                wrong.append(f"{module} (shared) imports {target} ({there})")
            elif here in STAGES and there != "shared" and there != here:
                wrong.append(f"{module} (stage {here}) imports {target} ({there})")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_walk_sees_imports_in_functions_and_the_packages_on_the_way(tmp_path):
    """The checks above would pass on nothing: the walk must find a lazy import and a package's __init__."""
    edges = graph()
    assert "pipeline.engines" in edges["pipeline.filter.judge"] or "pipeline.engines" in edges["pipeline.filter.replay"]
    assert "pipeline.config" in edges["pipeline.runs"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_readme_layout_names_every_module_of_the_tree():
    """README's layout section is the map a newcomer reads first: every module and folder of pipeline/ is on it."""
    readme = (ROOT.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    layout = layout[: layout.index("```", layout.index("```") + 3)]
    named = set(layout.replace("/", " / ").replace(",", " ").replace("(", " ").replace(")", " ").split())
    missing = [
        str(path.relative_to(ROOT))
        for path in sorted(ROOT.rglob("*"))
        if "__pycache__" not in path.parts
        and (path.suffix == ".py" and path.name != "__init__.py" or path.is_dir())
        and not (path.is_dir() and path.name == "data")
        and path.name not in named
        and path.stem not in named
    ]
    assert not missing, f"README's layout does not name: {', '.join(missing)}"


def test_a_long_module_says_why():
    """Past ~450 lines a module is two rooms; one that stays one says why in its docstring ("Longer than ...")."""
    long = [
        str(path.relative_to(ROOT))
        for path in ROOT.rglob("*.py")
        if len(path.read_text().splitlines()) > 450
        and "Longer than" not in (ast.get_docstring(ast.parse(path.read_text())) or "")
    ]
    assert not long, f"over 450 lines without a reason in the docstring: {', '.join(long)}"
