"""The documentation's links hold: code cites docs by stable anchors, and every anchor and relative link exists.

Anchors are GitHub's: a heading's slug, or an explicit `<a id="..."></a>`. Headings and links inside fenced code
blocks do not count. Code cites `docs/<file>.md#<anchor>` or `README.md#<anchor>`, never a section number,
which renumbering would silently break.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("pipeline", "flows", "tests", "scripts")
MAX_README_LINES = 320

SECTION_SIGN = "\u00a7"  # spelled out so that this file holds no section-number citation itself
OLD_CITATION = re.compile(r"ARCHITECTURE\.md\s*" + SECTION_SIGN)
BARE_SECTION = re.compile(r"(?<!paper's )(?<!its )" + SECTION_SIGN + r"\d")
CODE_CITATION = re.compile(r"(?<![\w./-])(docs/[\w./-]+\.md|README\.md)#([\w-]+)")
MD_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
EXPLICIT_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def code_files() -> list[Path]:
    return sorted(p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py"))


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of a markdown file outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def github_slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped (hyphens and underscores kept), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """Every anchor a link may name in a markdown file: explicit ids and heading slugs (repeats get -1, -2 ...)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(path):
        found.update(EXPLICIT_ANCHOR.findall(line))
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            slug = github_slug(heading.group(1))
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return frozenset(found)


def broken(target: Path, anchor: str | None) -> str | None:
    """Why a link to `target#anchor` does not resolve, or None when it does."""
    if not target.exists():
        return f"{target.relative_to(ROOT)} does not exist"
    if anchor and target.suffix == ".md" and anchor not in anchors(target):
        return f"{target.relative_to(ROOT)} has no anchor #{anchor}"
    return None


def test_github_slugs() -> None:
    assert github_slug("Set-up: two commands") == "set-up-two-commands"
    assert github_slug("Prefect in production: deployments, schedules, events") == \
        "prefect-in-production-deployments-schedules-events"
    assert github_slug("`make demo`") == "make-demo"


def test_code_cites_existing_docs_anchors() -> None:
    problems, cited = [], 0
    for path in code_files():
        for match in CODE_CITATION.finditer(path.read_text()):
            cited += 1
            why = broken(ROOT / match.group(1), match.group(2))
            if why:
                problems.append(f"{path.relative_to(ROOT)}: {match.group(0)}: {why}")
    assert not problems, "\n".join(problems)
    assert cited > 50, "code cites the docs by anchor (run the citation rewrite after a merge)"


def test_markdown_links_resolve() -> None:
    problems = []
    for path in doc_files():
        for number, line in prose_lines(path):
            for link in MD_LINK.findall(line):
                if re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:, file:
                    continue
                where, _, anchor = link.partition("#")
                target = (path.parent / where).resolve() if where else path
                why = broken(target, anchor or None)
                if why:
                    problems.append(f"{path.relative_to(ROOT)}:{number}: ({link}): {why}")
    assert not problems, "\n".join(problems)


def test_no_section_number_citations() -> None:
    problems = []
    for path in code_files() + doc_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if OLD_CITATION.search(line) or (path.suffix == ".py" and BARE_SECTION.search(line)):
                problems.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not problems, "cite docs/<file>.md#<anchor> instead:\n" + "\n".join(problems)


def test_readme_is_a_short_guide() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move reference text into docs/"


@pytest.mark.parametrize("name", ["ARCHITECTURE.md", "cache-format.md", "methods.md", "operations.md",
                                  "results.md", "research/tcs.md", "guide.md"])
def test_every_doc_is_linked_from_the_readme(name: str) -> None:
    assert f"(docs/{name}" in (ROOT / "README.md").read_text()
