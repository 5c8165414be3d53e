"""The HTML report: one self-contained page with its figures, and (acceptance) it renders in headless Chromium."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cache.reader import TeacherCache
from pipeline.data.datasets import load_dataset
from pipeline.lab.synthetic import write_synthetic_cache
from pipeline.report.content import gather_report
from pipeline.report.html import write_report
from pipeline.report.markdown import report_markdown
from pipeline.report.sections import report_sections

from chromium import Chromium, find_chromium, screenshot_page  # tests/report/chromium.py, beside this file

IMAGES = re.compile(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


@pytest.fixture(scope="module")
def report_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of a cache with every section: logits, PCA, CKA, Gaussians, LSH codes, views."""
    tmp = tmp_path_factory.mktemp("html")
    cache = write_synthetic_cache(tmp / "cache", load_dataset("digits"), views=3, dim=16, channels=4, lsh_bits=32,
                                  shard_size=500, block_size=100)
    write_report(cache, tmp / "report.html")
    return tmp / "report.html"


def test_the_page_is_self_contained_with_one_png_per_section(report_page: Path) -> None:
    page = report_page.read_text()
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # nothing loaded from elsewhere
    figures = dict(IMAGES.findall(page))
    assert set(figures) == {"Storage", "Teacher accuracy per view", "PCA of pooled features",
                            "CKA category interrelations", "Gaussian statistics", "LSH codes", "Views"}
    for title, data in figures.items():
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.format == "PNG" and min(image.size) > 100, title
    for text in ("components for 90% of the variance", "10-NN accuracy", "neighbour label agreement",
                 "same-class pair closer", "interrelation", "features/pooled", "stats/lsh/planes",
                 "per sample (zarr rows + shards)", "teacher trained on", "random weights"):
        assert text in page
    # Every figure says what it is measured on: the split, and which views.
    captions = re.findall(r"<figcaption>Measured on ([^<]+)</figcaption>", page)
    assert len(captions) == len(figures)
    assert all(c.startswith("digits train split") and "view" in c for c in captions), captions


def test_the_markdown_artifact_states_what_each_table_is_measured_on(report_page: Path) -> None:
    report = gather_report(TeacherCache(report_page.parent / "cache"), samples=0)
    page = report_markdown(report, "cache")
    scopes = re.findall(r"^_measured on (.+)_$", page, flags=re.M)
    assert scopes == [s.scope for s in report_sections(report) if s.scope] and len(scopes) == 6
    assert "- teacher trained on: nothing: random weights (no checkpoint)" in page


def test_absent_sections_say_why_and_names_are_escaped(digits_cache: Path, tmp_path: Path) -> None:
    cache = TeacherCache(digits_cache)
    cache.manifest.dataset.class_names = ["<b>zero</b>", *cache.class_names[1:]]
    write_report(cache, tmp_path / "r.html", samples=0)
    page = (tmp_path / "r.html").read_text()
    assert "no LSH codes (the cache was made without --lsh-bits)" in page and "views not rendered" in page
    assert "&lt;b&gt;zero&lt;/b&gt;" in page and "<b>zero</b>" not in page
    assert "LSH codes" not in dict(IMAGES.findall(page))


WIDTH = 1280


@pytest.fixture(scope="module")
def needs_chromium() -> None:
    if find_chromium() is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; `make test` installs it)")


@pytest.fixture(scope="module")
def browser(needs_chromium: None) -> Chromium:
    """One headless Chromium for the module, its page 1280 CSS px wide (device scale 1)."""
    with Chromium(WIDTH, 900) as chromium:
        yield chromium


# Per section of the loaded page: its id, its box in page coordinates, the width its content can take,
# and the box and source of each of its figures.
MEASURE = """[...document.querySelectorAll('main section')].map(s => {
  const box = e => { const r = e.getBoundingClientRect();
                     return {x: r.left, y: r.top + window.scrollY, width: r.width, height: r.height}; };
  const style = getComputedStyle(s);
  return {id: s.id, ...box(s), content: s.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight),
          figures: [...s.querySelectorAll('figure img')].map(i => ({...box(i), src: i.src}))};
})"""


def rgb(png: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    return np.asarray(image if size is None else image.resize(size, Image.Resampling.BILINEAR), np.float64) / 255


def test_each_section_in_headless_chromium_at_1280_px(report_page: Path, browser: Chromium, tmp_path: Path) -> None:
    browser.open(report_page.as_uri())
    assert browser.evaluate("document.documentElement.scrollWidth") == WIDTH  # nothing wider than the window
    sections = browser.evaluate(MEASURE)
    contents = browser.evaluate("[...document.querySelectorAll('nav a')].map(a => a.getAttribute('href'))")
    assert contents == [f"#{s['id']}" for s in sections] and len(sections) == 8
    assert sum(len(s["figures"]) for s in sections) == 7
    for s in sections:
        shot = browser.screenshot(0, s["y"], WIDTH, s["height"])
        (tmp_path / f"{s['id']}.png").write_bytes(shot)
        pixels = rgb(shot)
        non_white = (pixels.min(-1) < 0.9).mean()
        print(f"{s['id']}: {pixels.shape[1]}x{pixels.shape[0]} px, {non_white:.1%} non-white")
        # Chromium rounds a clip at fractional page coordinates to whole pixels at both edges: +-1 row.
        assert pixels.shape[1] == WIDTH and abs(pixels.shape[0] - s["height"]) <= 1, (s["id"], pixels.shape)
        assert non_white > 0.02 and pixels.std() > 0.05, s["id"]
        for f in s["figures"]:
            # A figure spans the column (never half-width beside empty space), and what the browser drew there
            # is the embedded PNG.
            assert f["width"] >= 0.9 * s["content"], (s["id"], f["width"], s["content"])
            drawn = rgb(browser.screenshot(f["x"], f["y"], f["width"], f["height"]))
            embedded = rgb(base64.b64decode(f["src"].removeprefix("data:image/png;base64,")), drawn.shape[1::-1])
            assert np.abs(drawn - embedded).mean() < 0.03, s["id"]


def test_the_contents_bar_stays_on_top_and_links_land_below_it(report_page: Path, browser: Chromium) -> None:
    browser.open(report_page.as_uri() + "#lsh")
    nav = browser.evaluate("(r => [r.top, r.bottom])(document.querySelector('nav').getBoundingClientRect())")
    heading = browser.evaluate("document.querySelector('#lsh h2').getBoundingClientRect().top")
    assert browser.evaluate("window.scrollY") > 2000  # the page scrolled down to the section
    assert nav[0] == 0 and nav[1] <= heading <= nav[1] + 40  # bar at the top, heading just below it


def test_the_screenshot_command_shows_the_section_under_the_contents_bar(report_page: Path, tmp_path: Path,
                                                                         needs_chromium: None) -> None:
    top, cka = tmp_path / "top.png", tmp_path / "cka.png"
    screenshot_page(report_page, top, width=WIDTH, height=600)
    screenshot_page(report_page, cka, width=WIDTH, height=600, anchor="cka")
    top_pixels, cka_pixels = rgb(top.read_bytes()), rgb(cka.read_bytes())
    assert top_pixels.shape == cka_pixels.shape == (600, WIDTH, 3)
    # The same contents bar heads both; below it, another part of the page.
    assert np.abs(top_pixels[:20] - cka_pixels[:20]).mean() < 0.01
    assert np.abs(top_pixels[100:] - cka_pixels[100:]).mean() > 0.05
