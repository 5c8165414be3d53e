"""The cache report as markdown (the teacher flow's Prefect artifact): the HTML page's tables and text.

Prefect's UI does not reliably show images embedded in markdown artifacts, so the figures are left out;
every number they plot is in the tables and lines (the HTML report has the pictures).
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

from pipeline.report.content import CacheReport
from pipeline.report.sections import report_sections

_MARKUP = re.compile(r"([\\`\[\]|])")


def escape(value: object) -> str:
    """``value`` as markdown text on one line that can render nothing but text: HTML is inert (``<img>``
    shows as text) and the characters of links, images, code and table cells are backslash-escaped
    (emphasis may still render: it cannot fetch or run anything, and `test_resnet` stays readable). Class
    names, paths and model names come from a cache, which is untrusted input (docs/cache-format.md,
    security model)."""
    return _MARKUP.sub(r"\\\1", html.escape(" ".join(str(value).splitlines()), quote=False))


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(escape(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(escape(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report_markdown(report: CacheReport, title: str, intro: Sequence[str] = ()) -> str:
    """The report's sections as markdown under `title`; `intro` lines go first (e.g. the pass's throughput)."""
    out = [f"# {escape(title)}", *intro]
    for section in report_sections(report):
        out += ["", f"## {escape(section.title)}"]
        if section.note:
            out.append(f"_{escape(section.note)}_")
        if section.scope:
            out.append(f"_measured on {escape(section.scope)}_")
        out += [f"- {escape(key)}: {escape(value)}" for key, value in section.lines]
        if section.rows:
            out += ["", markdown_table(section.columns, section.rows)]
    return "\n".join(out) + "\n"
