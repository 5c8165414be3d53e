"""The HTML report: one self-contained page with its figures, and (acceptance) it renders in headless Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cache.store import TeacherCache
from pipeline.data.datasets import load_dataset
from pipeline.report.bench import write_synthetic_cache
from pipeline.report.html import write_report

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
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing loaded from elsewhere
    figures = dict(IMAGES.findall(page))
    assert set(figures) == {"Storage", "Teacher accuracy per view", "PCA of pooled features",
                            "CKA category interrelations", "Gaussian statistics", "LSH codes", "Views"}
    for title, data in figures.items():
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.format == "PNG" and min(image.size) > 100, title
    for text in ("components for 90% of the variance", "10-NN accuracy", "bit balance", "interrelation",
                 "features/pooled", "stats/lsh/planes", "per sample (zarr rows + shards)"):
        assert text in page


def test_absent_sections_say_why_and_names_are_escaped(digits_cache: Path, tmp_path: Path) -> None:
    cache = TeacherCache(digits_cache)
    cache.manifest.dataset["class_names"] = ["<b>zero</b>", *cache.class_names[1:]]
    write_report(cache, tmp_path / "r.html", samples=0)
    page = (tmp_path / "r.html").read_text()
    assert "no LSH codes (the cache was made without --lsh-bits)" in page and "views not rendered" in page
    assert "&lt;b&gt;zero&lt;/b&gt;" in page and "<b>zero</b>" not in page
    assert "LSH codes" not in dict(IMAGES.findall(page))


def screenshot(page: Path, out: Path) -> np.ndarray:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; `make test` installs it)")
    # --no-sandbox: the sandbox needs user namespaces, which containers and root sessions often lack.
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={out}", "--window-size=1100,2600", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.float64) / 255


def test_the_report_renders_in_headless_chromium_with_its_plots(report_page: Path, tmp_path: Path) -> None:
    pixels = screenshot(report_page, tmp_path / "shot.png")
    assert pixels.shape == (2600, 1100, 3)
    non_white = (pixels.min(-1) < 0.9).mean()
    # Text and tables are black or grey; only the plots (bars, curves, heatmap) are coloured.
    saturation = pixels.max(-1) - pixels.min(-1)
    coloured = (saturation > 0.3).mean()
    print(f"screenshot: {non_white:.1%} non-white, {coloured:.1%} coloured pixels, std {pixels.std():.3f}")
    assert non_white > 0.05 and coloured > 0.02 and pixels.std() > 0.1
