"""The cache report's markdown (the Prefect artifact) shows untrusted text literally: no HTML, no images."""

from __future__ import annotations

import markdown  # Python-Markdown, installed with Prefect: renders as a markdown viewer would

from pipeline.report.markdown import escape, markdown_table

HOSTILE = ["<img src=x onerror=alert(1)>", "![pixel](http://tracker.example/p.png)", "[click](javascript:x)",
           "a|b", "**bold** _it_ `code` # head", "two\nlines"]


def test_hostile_class_names_render_as_their_own_text() -> None:
    page = markdown.markdown(markdown_table(["class", "count"], [[name, 3] for name in HOSTILE]),
                             extensions=["tables"])
    assert "<img" not in page and "<a " not in page and "<code>" not in page and page.count("<tr>") == len(HOSTILE) + 1  # no cell split by a '|'
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "![pixel](http://tracker.example/p.png)" in page


def test_escaping_keeps_plain_text_and_numbers_as_they_are() -> None:
    assert escape("test_resnet 0.875 1.5e-3 a-b (c) 60.00 ± 1.2 %") == "test_resnet 0.875 1.5e-3 a-b (c) 60.00 ± 1.2 %"
    assert escape("two\nlines") == "two lines"
