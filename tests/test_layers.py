"""The house's floors (docs/ARCHITECTURE.md#layers), read off every module's imports (ast, nothing imported).

Every module of `pipeline/` and `flows/` stands on a tier: the foundation (the plain modules of the flat
`pipeline/` root), then packages that import only tiers below their own, `lab` above the library, and `flows`
on top. An import to a higher tier is an upward arrow and fails; so does one to another package of one's own
tier (`teacher` and `methods` know nothing of each other), except between foundation modules, which import
each other freely as long as they never go round in a circle. Inside any package, modules never import each
other in a circle. The tiers are written once, here, and again in the section's table.
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TIERS: list[set[str]] = [
    # the foundation: plain modules of pipeline/ (errors, atomic writes, bounded reads, checksums, option checks,
    # progress hooks, the machine's description, the one path type for a directory or an fsspec URL, stop requests)
    {"errors", "atomic", "bounded", "checksums", "environment", "options", "progress", "object_store", "stop"},
    {"data", "nets", "stats"},  # datasets and views; timm models and taps; mergeable reducers (import no package)
    {"cache"},  # the store: the one place that knows file formats, and each cached target
    {"teacher", "methods"},  # the teacher and its pass produce targets; methods consume them
    {"train", "report"},  # students, the stream, the loop, run directories; the cache report
    {"preflight"},  # warnings before wasted work, from what train (run directories) and cache know
    {"lab"},  # experiments, benchmarks, the synthetic-cache writer: nothing in the library imports them
    {"flows"},  # Prefect flows and the `distillery` command line: the library never imports them
]
"""Tiers, lowest first. A module's part decides its tier: `pipeline.<part>...`, or `flows` for all of flows/."""

TIER = {part: tier for tier, parts in enumerate(TIERS) for part in parts}
FOUNDATION = TIERS[0]

MAX_LINES = 520
"""The most lines a module may have: about 500, a room one reader can hold in mind (with a little slack, so a
change that adds a few lines to a full room does not have to split it on the spot)."""


def modules() -> list[Path]:
    """Every module (room) of the library and of the flows, __init__.py files included."""
    return sorted(p for d in ("pipeline", "flows") for p in (ROOT / d).rglob("*.py"))


def dotted(path: Path) -> str:
    """`pipeline/cache/store.py` -> `pipeline.cache.store`; a package's `__init__.py` -> the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def module_files() -> dict[str, str]:
    """Dotted name -> path (relative to ROOT) of every module, packages included."""
    return {dotted(p): str(p.relative_to(ROOT)) for p in modules()}


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, wherever the import statement is (functions included), absolute; `from a
    import b` names `a.b` too when that is a module of the tree."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names
                         if node.level or f"{module}.{alias.name}" in module_files())
    return found


def part(module: str) -> str | None:
    """The part (`TIERS` name) of a dotted module of this tree, None outside it."""
    top, _, rest = module.partition(".")
    if top == "flows":
        return "flows"
    if top == "pipeline" and rest:
        return rest.split(".")[0]
    return None


def upward_imports(path: Path, imports: set[str]) -> list[str]:
    """The imports of module `path` that break the tiers (upward arrows), as readable lines."""
    where = str(path.relative_to(ROOT))
    own = part(dotted(path))
    bad = []
    for module in sorted(imports):
        top = module.partition(".")[0]
        other = part(module)
        if top == "prefect" and own != "flows":
            bad.append(f"{where} imports {module}: the library never imports prefect")
        elif other is None or other == own:
            continue
        elif other not in TIER or own not in TIER:
            unknown = other if other not in TIER else own
            bad.append(f"{where} imports {module}: {unknown} has no tier in TIERS")
        elif other == "flows":
            bad.append(f"{where} imports {module}: the library never imports flows")
        elif TIER[other] > TIER[own] or (TIER[other] == TIER[own] and own not in FOUNDATION):
            bad.append(f"{where} imports {module}: tier of {other} ({TIER[other]}) is not below that of {own} "
                       f"({TIER[own]})")
    return bad


def package_of(module: str) -> str:
    """The package a module belongs to: its parent, or itself for a package (its `__init__.py`)."""
    return module if module_files()[module].endswith("__init__.py") else module.rpartition(".")[0]


def circles() -> list[frozenset[str]]:
    """The import circles inside each package: strongly connected sets of modules of one package (Tarjan)."""
    names = module_files()
    graph = {m: {i for i in imported_modules(ROOT / f) if i in names and i != m and package_of(i) == package_of(m)}
             for m, f in names.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        for n in graph[m]:
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            members = set()
            while True:
                member = stack.pop()
                members.add(member)
                if member == m:
                    break
            if len(members) > 1:
                found.append(frozenset(names[x] for x in members))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return found


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_every_part_has_a_tier() -> None:
    parts = {part(dotted(p)) for p in modules()} - {None}
    assert parts == set(TIER), f"parts without a tier: {sorted(parts - set(TIER))}; stale: {sorted(set(TIER) - parts)}"


def test_no_upward_arrows() -> None:
    problems = [line for path in modules() for line in upward_imports(path, imported_modules(path))]
    assert not problems, "\n".join(problems)


def test_no_circle_inside_a_package() -> None:
    found = circles()
    assert found == [], f"import circles: {[sorted(c) for c in found]}"


@pytest.mark.parametrize("module, imports, broken", [
    ("pipeline/cache/writer.py", {"pipeline.teacher.model"}, "tier of teacher (3) is not below that of cache (2)"),
    ("pipeline/teacher/plan.py", {"pipeline.methods.base"}, "tier of methods (3) is not below that of teacher (3)"),
    ("pipeline/train/loop.py", {"pipeline.lab.synthetic"}, "tier of lab (6) is not below that of train (4)"),
    ("pipeline/stats/lsh.py", {"prefect"}, "the library never imports prefect"),
    ("pipeline/train/loop.py", {"flows.params"}, "the library never imports flows"),
    ("pipeline/errors.py", {"pipeline.data.views"}, "tier of data (1) is not below that of errors (0)"),
    ("pipeline/object_store.py", {"pipeline.atomic", "pipeline.errors", "pipeline.options"}, None),  # foundation
    ("pipeline/data/views.py", {"pipeline.data.rendering", "pipeline.errors", "numpy"}, None),
    ("flows/cli/lab.py", {"pipeline.lab.bench", "flows.server", "prefect"}, None),
])
def test_an_upward_import_is_named(module: str, imports: set[str], broken: str | None) -> None:
    found = upward_imports(ROOT / module, imports)
    assert (found == []) if broken is None else (len(found) == 1 and broken in found[0]), found


def test_a_circle_inside_a_package_is_found(tmp_path: Path, monkeypatch) -> None:
    package = tmp_path / "pipeline" / "pkg"
    package.mkdir(parents=True)
    for name, source in {"__init__.py": "", "a.py": "from pipeline.pkg import b\n",
                         "b.py": "def f():\n    import pipeline.pkg.c\n", "c.py": "from . import a\n",
                         "d.py": "import pipeline.pkg.a\n"}.items():
        (package / name).write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    module_files.cache_clear()
    try:
        assert circles() == [frozenset({"pipeline/pkg/a.py", "pipeline/pkg/b.py", "pipeline/pkg/c.py"})]
    finally:
        module_files.cache_clear()


def test_relative_and_local_imports_are_seen() -> None:
    # `from .base import` in a method, `from .registry import` in methods/spec (`from . import a`: the circle
    # test's), an import inside a function in the cli, `from pipeline.report import figures` naming a module.
    assert "pipeline.methods.base" in imported_modules(ROOT / "pipeline" / "methods" / "kd.py")
    assert "pipeline.methods.registry" in imported_modules(ROOT / "pipeline" / "methods" / "spec.py")
    assert "pipeline.teacher.plan" in imported_modules(ROOT / "flows" / "cli" / "teacher.py")
    assert "pipeline.report.figures" in imported_modules(ROOT / "pipeline" / "report" / "html.py")


def house_numbers() -> dict[str, object]:
    """farm-studio's numbers of the house: rooms (modules), packages, floors (tiers, and the longest chain of
    imports between parts), upward arrows, circles and the largest room."""
    rooms = modules()
    edges: dict[str, set[str]] = {}
    for path in rooms:
        own = part(dotted(path))
        edges.setdefault(own, set()).update(o for o in map(part, imported_modules(path)) if o and o != own)

    @cache
    def depth(p: str) -> int:
        return 1 + max((depth(o) for o in edges.get(p, ()) if TIER[o] < TIER[p]), default=0)

    largest = max(rooms, key=line_count)
    return {"rooms": len(rooms), "packages": sum(p.name == "__init__.py" for p in rooms), "floors": len(TIERS),
            "longest chain": max(depth(p) for p in edges),
            "upward arrows": sum(len(upward_imports(p, imported_modules(p))) for p in rooms),
            "circles": len(circles()), "largest": f"{largest.relative_to(ROOT)} ({line_count(largest)} lines)",
            "over limit": sorted(str(p.relative_to(ROOT)) for p in rooms if line_count(p) > MAX_LINES)}


def test_house_numbers() -> None:
    numbers = house_numbers()
    print("house numbers: " + ", ".join(f"{k} {v}" for k, v in numbers.items()))
    assert numbers["upward arrows"] == 0
    assert numbers["circles"] == 0
    assert numbers["over limit"] == [], f"modules over {MAX_LINES} lines: {numbers['over limit']}"
