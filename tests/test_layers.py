"""The import layers of docs/ARCHITECTURE.md#layers, read off every module's imports (ast, nothing imported).

`pipeline` never imports `flows` or `prefect`; inside it, a module imports only its own package and the
layers below its own (a layer's packages do not import each other either). The rank of every package is
written once, here, and again in the section's table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS: list[set[str]] = [
    {"errors"},  # DistilleryError, the base of every one-line error
    {"atomic", "bounded", "checksums", "options", "progress", "environment"},  # plain modules of pipeline/
    {"data", "nets", "object_store"},
    {"stats"},
    {"cache"},
    {"teacher", "methods"},
    {"train"},
    {"report", "preflight"},  # preflight: warnings before wasted work, from what train and cache know
    {"experiments", "bench_loader", "bench_storage"},  # whole scenarios and single benchmarks
    {"bench"},  # `distillery bench`: every benchmark side by side
]
"""Layers of `pipeline`, lowest first: the second part of a module's name (`pipeline.<part>...`) decides."""

RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, wherever the import statement is (functions included), absolute."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            found.add(module)
            if node.level:  # `from . import ce` names submodules
                found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def upward_imports(path: Path, imports: set[str]) -> list[str]:
    """The imports of module `path` (under pipeline/) that break the layers, as readable lines."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    own = parts[1]
    bad = []
    for module in sorted(imports):
        top, _, rest = module.partition(".")
        if top in ("flows", "prefect"):
            bad.append(f"{path.relative_to(ROOT)} imports {module}: the library never imports {top}")
        elif top == "pipeline" and rest:
            other = rest.split(".")[0]
            if other == own or other == "__init__":
                continue
            if other not in RANK:
                bad.append(f"{path.relative_to(ROOT)} imports {module}: pipeline.{other} has no layer in LAYERS")
            elif RANK[other] >= RANK[own]:
                bad.append(f"{path.relative_to(ROOT)} imports {module}: layer of {other} ({RANK[other]}) is not "
                           f"below that of {own} ({RANK[own]})")
    return bad


def library_modules() -> list[Path]:
    return sorted(p for p in (ROOT / "pipeline").rglob("*.py") if p.name != "__init__.py" or p.parent.name != "pipeline")


def test_every_library_package_and_module_has_a_layer() -> None:
    parts = {p.relative_to(ROOT / "pipeline").with_suffix("").parts[0] for p in library_modules()}
    assert parts == set(RANK), f"packages without a layer: {sorted(parts - set(RANK))}; stale: {sorted(set(RANK) - parts)}"


def test_no_library_module_imports_flows_prefect_or_a_layer_above_its_own() -> None:
    problems = [line for path in library_modules() for line in upward_imports(path, imported_modules(path))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module, imports, broken", [
    ("pipeline/cache/writer.py", {"pipeline.teacher.model"}, "layer of teacher (5) is not below that of cache (4)"),
    ("pipeline/teacher/plan.py", {"pipeline.methods.base"}, "layer of methods (5) is not below that of teacher (5)"),
    ("pipeline/stats/lsh.py", {"prefect"}, "the library never imports prefect"),
    ("pipeline/train/loop.py", {"flows.params"}, "the library never imports flows"),
    ("pipeline/data/views.py", {"pipeline.data.rendering", "pipeline.errors", "numpy"}, None),
])
def test_an_upward_import_is_named(module: str, imports: set[str], broken: str | None) -> None:
    found = upward_imports(ROOT / module, imports)
    assert (found == []) if broken is None else (len(found) == 1 and broken in found[0]), found


def test_relative_and_local_imports_are_seen() -> None:
    # `from .base import` in a method, `from . import kd` in methods/__init__, an import inside a function in cli.
    assert "pipeline.methods.base" in imported_modules(ROOT / "pipeline" / "methods" / "kd.py")
    assert "pipeline.methods.kd" in imported_modules(ROOT / "pipeline" / "methods" / "__init__.py")
    assert "pipeline.teacher.plan" in imported_modules(ROOT / "flows" / "cli.py")
