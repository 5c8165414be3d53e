"""The cache report as markdown (the teacher flow's Prefect artifact): the HTML page's tables and text.

Prefect's UI does not reliably show images embedded in markdown artifacts, so the figures are left out;
every number they plot is in the tables and lines (the HTML report has the pictures).
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.report.content import CacheReport
from pipeline.report.sections import report_sections


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report_markdown(report: CacheReport, title: str, intro: Sequence[str] = ()) -> str:
    """The report's sections as markdown under `title`; `intro` lines go first (e.g. the pass's throughput)."""
    out = [f"# {title}", *intro]
    for section in report_sections(report):
        out += ["", f"## {section.title}"]
        if section.note:
            out.append(f"_{section.note}_")
        if section.scope:
            out.append(f"_measured on {section.scope}_")
        out += [f"- {key}: {value}" for key, value in section.lines]
        if section.rows:
            out += ["", markdown_table(section.columns, section.rows)]
    return "\n".join(out) + "\n"
