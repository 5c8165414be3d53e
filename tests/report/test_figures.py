"""Plots use the tables' units: accuracy in percent."""

from __future__ import annotations

import numpy as np

from pipeline.report import figures


def test_the_runs_plot_draws_accuracy_in_percent(monkeypatch) -> None:
    drawn = {}
    monkeypatch.setattr(figures, "png", lambda fig: drawn.setdefault("fig", fig) and b"png")
    figures.accuracy_vs_time(["ce", "kd"], [3.0, 4.0], [0.1, 0.2], [0.6, 0.725], [0.01, 0.02])
    ax = drawn["fig"].axes[0]
    assert ax.get_ylabel() == "validation accuracy (%)"
    points = [bar.lines[0].get_ydata()[0] for bar in ax.containers]  # each errorbar: data line, caps, bars
    np.testing.assert_allclose(sorted(points), [60.0, 72.5])
