"""The import graph: every package imports only the layers below it, and no module-level import cycle exists.

Layers, lowest first: vqgan, uvit, sampling (the leaves: none imports another project package); convert (imports
vqgan and uvit); muse (anything below it, nothing of train); train (anything). The one exception is the command-line
dispatcher, muse/cli.py, which runs the `train` and `convert` subcommands through imports inside functions.

A function-local import means one thing only: an optional heavy dependency loaded when it is used, with a comment
saying so on its line or the line above (or the dispatcher's upward reach). Everything is read with `ast`; nothing
is imported.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vqgan", "uvit", "sampling", "convert", "muse", "train")
ALLOWED = {
    "vqgan": set(),
    "uvit": set(),
    "sampling": set(),
    "convert": {"vqgan", "uvit"},
    "muse": {"vqgan", "uvit", "sampling", "convert"},
    "train": {"vqgan", "uvit", "sampling", "convert", "muse"},
}
# the dispatcher may reach upward, only from inside a function (so `muse generate` never loads them)
DISPATCHER = {"muse/cli.py": {"train", "convert"}}
# optional heavy dependencies that may be imported inside a function
LAZY_OK = {"wandb", "bitsandbytes", "torch_fidelity", "open_clip", "datasets", "matplotlib"}


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository root, e.g. "muse/pipeline.py"
    line: int
    module: str  # absolute dotted name, e.g. "train.lora" or "torch"
    local: bool  # inside a function
    commented: bool  # a comment on its line or the line above


def module_name(rel: str) -> str:
    parts = rel.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_imports(rel: str, source: str) -> list[Import]:
    """Every import statement of one file, with relative imports resolved to absolute names."""
    tree = ast.parse(source, filename=rel)
    lines = source.splitlines()
    package = module_name(rel) if rel.endswith("__init__.py") else module_name(rel).rpartition(".")[0]
    found: list[Import] = []

    def commented(lineno: int) -> bool:
        here = lines[lineno - 1]
        above = lines[lineno - 2] if lineno >= 2 else ""
        return "#" in here or above.strip().startswith("#")

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(rel, child.lineno, alias.name, local, commented(child.lineno)))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    names = [".".join(base + ([child.module] if child.module else []))]
                    if not child.module:  # `from . import a, b`: each name is a module of the package
                        names = [f"{names[0]}.{a.name}" for a in child.names]
                else:
                    names = [child.module]
                for name in names:
                    found.append(Import(rel, child.lineno, name, local, commented(child.lineno)))
            visit(child, inner)

    visit(tree, False)
    return found


def violations(imports: list[Import]) -> list[str]:
    """Each upward import, and each function-local import that is neither an optional heavy dependency with a
    comment nor the dispatcher's, as 'file:line: message'."""
    out = []
    for imp in imports:
        here = imp.file.split("/")[0]
        there = imp.module.split(".")[0]
        if there in PACKAGES and there != here:
            upward_ok = imp.local and there in DISPATCHER.get(imp.file, set())
            if there not in ALLOWED[here] and not upward_ok:
                out.append(f"{imp.file}:{imp.line}: {here} imports {imp.module} (a layer above or beside it)")
                continue
        if imp.local:
            dispatch = there in DISPATCHER.get(imp.file, set())
            if not dispatch and (there not in LAZY_OK or not imp.commented):
                why = "not an optional heavy dependency" if there not in LAZY_OK else "no comment saying why"
                out.append(f"{imp.file}:{imp.line}: function-local import of {imp.module} ({why})")
    return out


def cycles(imports: list[Import], modules: set[str]) -> list[list[str]]:
    """Cycles among the project's modules through module-level imports (each reported once)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        if imp.local:
            continue
        src = module_name(imp.file)
        # `from a.b import c` depends on a.b (and on a.b.c when that is a module)
        targets = [imp.module]
        targets += [t for t in modules if t.startswith(imp.module + ".") and t.count(".") == imp.module.count(".") + 1]
        for t in targets:
            if t in modules and t != src and not (src.startswith(t + ".") and t.count(".") < src.count(".")):
                graph[src].add(t)
    found, state, stack = [], {}, []

    def dfs(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cyc = stack[stack.index(n) :] + [n]
                if sorted(cyc[:-1]) not in [sorted(c[:-1]) for c in found]:
                    found.append(cyc)
            elif n not in state:
                dfs(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    return found


def project_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def all_imports() -> list[Import]:
    return [imp for rel in project_files() for imp in read_imports(rel, (ROOT / rel).read_text())]


def test_no_upward_import_and_no_unexplained_local_import():
    problems = violations(all_imports())
    assert not problems, "import rules broken:\n" + "\n".join(problems)


def test_no_module_level_import_cycle():
    modules = {module_name(rel) for rel in project_files()}
    found = cycles(all_imports(), modules)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


# --- controls: the checks catch what they are meant to catch -----------------------------------------------------


def test_control_an_upward_import_is_caught_with_its_file_and_line():
    source = "import torch\n\nfrom train.loop import train\n"
    problems = violations(read_imports("muse/pipeline.py", source))
    assert problems == ["muse/pipeline.py:3: muse imports train.loop (a layer above or beside it)"]
    # a relative import that climbs out of the package counts too
    problems = violations(read_imports("convert/lora.py", "from ..muse import Pipeline\n"))
    assert problems == ["convert/lora.py:1: convert imports muse (a layer above or beside it)"]
    # and a leaf importing its sibling
    assert violations(read_imports("uvit/model.py", "import sampling\n"))


@pytest.mark.parametrize(
    "source, expected",
    [
        ("def f():\n    import json\n", "function-local import of json (not an optional heavy dependency)"),
        ("def f():\n    import wandb\n", "function-local import of wandb (no comment saying why)"),
        (
            "def f():\n    from muse import Pipeline\n",
            "function-local import of muse (not an optional heavy dependency)",
        ),
    ],
)
def test_control_unexplained_local_imports_are_caught(source, expected):
    problems = violations(read_imports("train/loop.py", source))
    assert len(problems) == 1 and expected in problems[0], problems


def test_control_allowed_imports_pass():
    ok = "import wandb  # optional: only with --report_to wandb\n"
    assert not violations(read_imports("train/tracking.py", "def f():\n    " + ok))
    assert not violations(read_imports("muse/cli.py", "def run_train(argv):\n    from train.cli import main\n"))
    # but the dispatcher may not import train at module level
    assert violations(read_imports("muse/cli.py", "from train.cli import main\n"))


def test_control_a_cycle_is_found():
    files = {"convert/a.py": "from .b import x\n", "convert/b.py": "from convert.a import y\n", "convert/c.py": ""}
    imports = [imp for rel, src in files.items() for imp in read_imports(rel, src)]
    found = cycles(imports, {"convert.a", "convert.b", "convert.c"})
    assert found == [["convert.a", "convert.b", "convert.a"]]
    # a local import breaks no cycle rule
    files["convert/b.py"] = "def f():\n    from convert.a import y\n"
    imports = [imp for rel, src in files.items() for imp in read_imports(rel, src)]
    assert cycles(imports, {"convert.a", "convert.b", "convert.c"}) == []
