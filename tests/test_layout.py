"""The package's shape: every import inside pipeline/ (those inside functions too) goes one way.

io/ stands on nothing above it; config, options and text (torch-free) on io/ only; stage one
(features/) and the paper's model (model/) on those only, and never on each other; they meet in
checkpoint, captioner, train/, eval/ and serve/. No import circle anywhere."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PIPELINE = ROOT / "pipeline"
BASE = {"pipeline.config", "pipeline.options", "pipeline.text"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """{module: the pipeline modules it imports}, relative imports resolved, ``from P import m``
    counted as module P.m where that is a module."""
    modules = {module_name(p): p for p in PIPELINE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("pipeline")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base.startswith("pipeline"):
                    found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = found - {name}
    return graph


def group(module: str) -> str:
    parts = module.split(".")
    return module if module in BASE or len(parts) == 2 else ".".join(parts[:2])


def test_imports_go_one_way():
    allowed = {
        "pipeline.io": {"pipeline.io"},
        **{m: {"pipeline.io"} | BASE for m in BASE},
        "pipeline.features": {"pipeline.io", "pipeline.features"} | BASE,
        "pipeline.model": {"pipeline.io", "pipeline.model"} | BASE,
    }
    wrong = [
        f"{m} imports {i}"
        for m, found in imports().items()
        for i in found
        if group(m) in allowed and group(i) not in allowed[group(m)]
    ]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circle():
    graph = imports()
    done, path = set(), []

    def visit(m):
        assert m not in path, "import circle: " + " -> ".join(path[path.index(m) :] + [m])
        if m in done:
            return
        path.append(m)
        for i in sorted(graph.get(m, ())):
            visit(i)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_a_stage_loads_without_the_other():
    """Importing stage one loads no module of the model, and the model none of stage one."""
    for stage, other in (
        ("pipeline.features.extract", "pipeline.model"),
        ("pipeline.model.decode", "pipeline.features"),
    ):
        code = f"import sys, {stage}; print([m for m in sys.modules if m.startswith('{other}')])"
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]", f"{stage} loads {out.stdout}"
