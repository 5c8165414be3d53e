"""The cache report as one self-contained HTML page: a sticky contents bar, then each section's text, its
page-wide figure (PNG embedded as base64, captioned with the split and view it is measured on) and tables."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from pathlib import Path

from pipeline.object_store import ObjectPath, location, write_whole_bytes
from pipeline.cache.reader import TeacherCache
from pipeline.report import figures
from pipeline.report.content import CacheReport, gather_report
from pipeline.report.sections import Section, report_sections

FIGURES: dict[str, Callable[[CacheReport, str], bytes]] = {
    "storage": lambda r, scope: figures.storage_bars([a.name for a in r.arrays], [a.stored_bytes for a in r.arrays],
                                                     scope),
    "teacher": lambda r, scope: figures.teacher_views(r.teacher, scope),
    "pca": lambda r, scope: figures.pca_curve(r.pca_ratio, r.pca_reach, scope),
    "cka": lambda r, scope: figures.cka_heatmap(r.cka, scope),
    "gaussian": lambda r, scope: figures.gaussian_channels(r.gaussian, scope),
    "lsh": lambda r, scope: figures.lsh_information(r.lsh, scope),
    "samples": lambda r, scope: figures.sample_grid(r.samples, scope),
}

# One column (at most 1200 px of content) under a contents bar that stays at the top while scrolling;
# `scroll-margin-top` keeps a section's heading below the bar when a contents link jumps to it.
STYLE = """
* { box-sizing: border-box; }
body { font-family: system-ui, sans-serif; margin: 0; color: #222; background: #fff; }
nav { position: sticky; top: 0; z-index: 1; background: #fafafa; border-bottom: 1px solid #ddd; }
nav ul { display: flex; flex-wrap: wrap; gap: .2em 1.4em; list-style: none; max-width: 1248px; margin: 0 auto;
         padding: .6em 24px; font-size: .92em; }
nav a { color: #1a5fb4; text-decoration: none; } nav a:hover { text-decoration: underline; }
main { max-width: 1248px; margin: 0 auto; padding: 0 24px 3em; }
h1 { font-size: 1.5em; margin: .8em 0 .2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: .2em; margin: 1.6em 0 .6em; }
section { scroll-margin-top: 3em; }
figure { margin: .8em 0; } figure img { display: block; width: 100%; height: auto; }
figcaption { color: #555; font-size: .88em; margin-top: .2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
th { background: #f3f3f3; } dl { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; }
dt { font-weight: 600; } dd { margin: 0; } .note { color: #777; }
"""


CACHE_REPORT_NAME = "report.html"  # beside manifest.json; no file the cache's integrity checks know


def _e(text: object) -> str:
    return html.escape(str(text))


def _section_html(section: Section, figure: bytes | None) -> str:
    parts = [f'<section id="{_e(section.key)}"><h2>{_e(section.title)}</h2>']
    if section.note:
        parts.append(f'<p class="note">{_e(section.note)}</p>')
    if section.lines:
        parts.append("<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in section.lines) + "</dl>")
    if figure is not None:
        parts.append(f'<figure><img alt="{_e(section.title)}" src="data:image/png;base64,'
                     f'{base64.b64encode(figure).decode("ascii")}"><figcaption>Measured on {_e(section.scope)}'
                     f'</figcaption></figure>')
    if section.rows:
        head = "".join(f"<th>{_e(c)}</th>" for c in section.columns)
        body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in section.rows)
        parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    parts.append("</section>")
    return "\n".join(parts)


def render_html(report: CacheReport, title: str) -> str:
    sections = report_sections(report)
    contents = "".join(f'<li><a href="#{_e(s.key)}">{_e(s.title)}</a></li>' for s in sections)
    body = [_section_html(s, None if s.empty or s.key not in FIGURES else FIGURES[s.key](report, s.scope))
            for s in sections]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>\n'
            f'<body><nav aria-label="contents"><ul>{contents}</ul></nav>\n<main><h1>{_e(title)}</h1>\n'
            + "\n".join(body) + "\n</main></body></html>\n")


def write_report(cache: TeacherCache, out: str | Path | ObjectPath, samples: int = 6) -> CacheReport:
    """Gather the report of `cache` and write it to `out` as one HTML file (no external resources)."""
    report = gather_report(cache, samples)
    page = render_html(report, f"Teacher cache {cache.root}")
    out = location(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_whole_bytes(out, page.encode())
    return report


def write_cache_report(cache: TeacherCache) -> Path | ObjectPath:
    """`write_report` to the cache's own `report.html` (every completed teacher pass writes one); its path."""
    path = cache.root.resolve() / CACHE_REPORT_NAME  # the directory resolved, never a link planted at the name
    write_report(cache, path)
    return path
