"""The report's figures: matplotlib (Agg, no display) rendered to PNG bytes, one function per figure."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless everywhere (CI, Prefect workers); must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pipeline.report.content import CkaSummary, GaussianStats, LshSummary, SampleViews  # noqa: E402

DPI = 100
# Above this many classes tick labels overlap; the top-pairs table names the classes instead.
MAX_LABELLED_CLASSES = 40


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes; the figure is closed (pyplot keeps every open figure alive)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def storage_bars(names: Sequence[str], stored_bytes: Sequence[int]) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(names) + 1))
    ax.barh(list(names), [max(b, 1) for b in stored_bytes], color="tab:blue")
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("bytes stored (log scale)")
    ax.set_title("Storage per array")
    return png(fig)


def teacher_views(rows: Sequence[dict[str, float]]) -> bytes:
    views = np.array([r["view"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(views - 0.2, [r["accuracy"] for r in rows], width=0.4, label="accuracy")
    ax.bar(views + 0.2, [r["confidence"] for r in rows], width=0.4, label="mean max probability")
    ax.set_xticks(views, [f"view {v}" + (" (clean)" if v == 0 else "") for v in views])
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right")
    ax.set_title("Teacher per stored view")
    return png(fig)


def pca_curve(ratio: np.ndarray, reach: dict[float, int]) -> bytes:
    """Cumulative explained variance with the component counts reaching each fraction in `reach`."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(ratio) + 1), ratio, color="tab:blue")
    for fraction, components in reach.items():
        ax.axhline(fraction, color="grey", lw=0.6, ls="--")
        ax.plot([components], [fraction], "o", color="tab:red")
        ax.annotate(f"{fraction:.0%}: {components}", (components, fraction), textcoords="offset points",
                    xytext=(6, -12))
    ax.set_xscale("log")
    ax.set_xlabel("principal components")
    ax.set_ylabel("explained variance (cumulative)")
    ax.set_ylim(0, 1.02)
    ax.set_title("PCA of view-0 pooled features")
    return png(fig)


def cka_heatmap(cka: CkaSummary) -> bytes:
    c = len(cka.class_names)
    side = min(9.0, 3 + 0.35 * c)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(cka.ir, cmap="viridis", vmin=min(0.0, float(cka.ir.min())), vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if c <= MAX_LABELLED_CLASSES:
        ax.set_xticks(range(c), cka.class_names, rotation=60, ha="right")
        ax.set_yticks(range(c), cka.class_names)
    ax.set_title(f"CKA category interrelations ({cka.source})")
    return png(fig)


def gaussian_channels(stats: GaussianStats) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 3))
    channels = np.arange(len(stats.channel_mean))
    ax.plot(channels, stats.channel_mean, label="mean of cell means", lw=1)
    ax.plot(channels, stats.channel_std, label="mean of cell stds", lw=1)
    ax.set_xlabel(f"channel of {stats.tap}")
    ax.legend()
    ax.set_title(f"Gaussian statistics per channel ({stats.grid}x{stats.grid} grid, view 0)")
    return png(fig)


def lsh_bit_balance(lsh: LshSummary) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(np.arange(lsh.bits), lsh.ones_fraction, width=1.0, color="tab:green")
    ax.axhline(0.5, color="black", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_xlabel("bit")
    ax.set_ylabel("share of codes with the bit set")
    ax.set_title(f"LSH bit balance ({lsh.bits} bits)")
    return png(fig)


def sample_grid(samples: SampleViews) -> bytes:
    s, v = samples.images.shape[:2]
    fig, axes = plt.subplots(s, v, figsize=(1.6 * v, 1.75 * s), squeeze=False, layout="constrained")
    for i in range(s):
        for j in range(v):
            ax = axes[i, j]
            image = samples.images[i, j]
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if samples.predictions is not None:
                name, p = samples.predictions[i][j]
                ax.set_xlabel(f"{name} {p:.0%}", fontsize=7, color="black" if name == samples.labels[i] else "red")
            if i == 0:
                ax.set_title(f"view {j}", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"id {samples.ids[i]}\n{samples.labels[i]}", fontsize=7)
    fig.suptitle("Stored views, re-rendered (teacher's top class below; red: wrong)", fontsize=9)
    return png(fig)


def accuracy_vs_time(labels: Sequence[str], seconds: Sequence[float], seconds_std: Sequence[float],
                     accuracy: Sequence[float], accuracy_std: Sequence[float]) -> bytes:
    """Student runs: validation accuracy against training time, one point per group (mean +- std)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, label in enumerate(labels):
        ax.errorbar(seconds[i], accuracy[i], xerr=seconds_std[i], yerr=accuracy_std[i], fmt="o", capsize=3,
                    label=label)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("Students: accuracy vs training time")
    return png(fig)
