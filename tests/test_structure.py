"""The code's shape that issue 15 set: short functions in the core, thin jobs, no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hvdtrain", "segmentation", "classification", "scaling", "tuning", "slurm", "jobs")


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_in_the_core_is_over_60_lines():
    long = [
        f"{p.relative_to(ROOT)}:{line} {name} ({n} lines)"
        for p in sorted((ROOT / "hvdtrain").glob("*.py"))
        for name, line, n in _functions(p)
        if n > 60
    ]
    assert not long, "split these into named steps:\n" + "\n".join(long)


def test_the_training_jobs_are_thin():
    for job in ("train_unet.py", "train_classifier.py"):
        lines = len((ROOT / "jobs" / job).read_text().splitlines())
        assert lines < 60, f"jobs/{job} has {lines} lines: parsing, build_run, fit, report belong in the packages"


def _module_imports(path: Path, module: str) -> set[str]:
    """First-party modules imported at module level (not inside functions)."""
    found = set()
    package = module.rsplit(".", 1)[0] if not path.name == "__init__.py" else module
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def test_no_import_cycle():
    modules = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).glob("*.py"):
            name = pkg if p.name == "__init__.py" else f"{pkg}.{p.stem}"
            modules[name] = p
    graph = {m: {i for i in _module_imports(p, m) if i in modules and i != m} for m, p in modules.items()}
    for m in graph:  # a package's __init__ re-exports its modules: importing it is not importing them back
        graph[m] = {i for i in graph[m] if not (i in PACKAGES and m.startswith(i + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n) :] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_horovod_is_imported_in_one_core_file():
    users = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "hvdtrain").glob("*.py"))
        if any(m.split(".")[0] == "horovod" for m in _all_imports(p))
    ]
    assert users == ["hvdtrain/dist.py"]


def _all_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names
