"""The cache report as one self-contained HTML page: tables, and PNG figures embedded as base64."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from pathlib import Path

from pipeline.atomic import atomic_write_text
from pipeline.cache.store import TeacherCache
from pipeline.report import figures
from pipeline.report.content import CacheReport, gather_report
from pipeline.report.sections import Section, report_sections

FIGURES: dict[str, Callable[[CacheReport], bytes]] = {
    "storage": lambda r: figures.storage_bars([a.name for a in r.arrays], [a.stored_bytes for a in r.arrays]),
    "teacher": lambda r: figures.teacher_views(r.teacher),
    "pca": lambda r: figures.pca_curve(r.pca_ratio, r.pca_reach),
    "cka": lambda r: figures.cka_heatmap(r.cka),
    "gaussian": lambda r: figures.gaussian_channels(r.gaussian),
    "lsh": lambda r: figures.lsh_bit_balance(r.lsh),
    "samples": lambda r: figures.sample_grid(r.samples),
}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
th { background: #f3f3f3; } dl { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; }
dt { font-weight: 600; } dd { margin: 0; } img { max-width: 100%; margin: .5em 0; } .note { color: #777; }
"""


def _e(text: object) -> str:
    return html.escape(str(text))


def _section_html(section: Section, figure: bytes | None) -> str:
    parts = [f'<section id="{_e(section.key)}"><h2>{_e(section.title)}</h2>']
    if section.note:
        parts.append(f'<p class="note">{_e(section.note)}</p>')
    if section.lines:
        parts.append("<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in section.lines) + "</dl>")
    if figure is not None:
        parts.append(f'<img alt="{_e(section.title)}" src="data:image/png;base64,'
                     f'{base64.b64encode(figure).decode("ascii")}">')
    if section.rows:
        head = "".join(f"<th>{_e(c)}</th>" for c in section.columns)
        body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in section.rows)
        parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    parts.append("</section>")
    return "\n".join(parts)


def render_html(report: CacheReport, title: str) -> str:
    body = [_section_html(s, None if s.empty or s.key not in FIGURES else FIGURES[s.key](report))
            for s in report_sections(report)]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body><h1>{_e(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(cache: TeacherCache, out: str | Path, samples: int = 6) -> CacheReport:
    """Gather the report of `cache` and write it to `out` as one HTML file (no external resources)."""
    report = gather_report(cache, samples)
    page = render_html(report, f"Teacher cache {cache.root}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    return report
