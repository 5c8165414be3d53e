"""The report's figures: matplotlib (Agg, no display) rendered to PNG bytes, one function per figure."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless everywhere (CI, Prefect workers); must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from pipeline.report.content import CkaSummary, GaussianStats, LshSummary, SampleViews  # noqa: E402

DPI = 100
# Every figure spans the page (12 in at 100 dpi: the report's 1200 px column), panels side by side.
WIDTH = 12.0
# Above this many classes tick labels overlap; the strongest-pairs panel names the classes instead.
MAX_LABELLED_CLASSES = 40
PAIR_COLOUR = "tab:red"


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes; the figure is closed (pyplot keeps every open figure alive). The figures lay
    themselves out (constrained layout, or fixed margins): no "tight" bounding box, which draws them twice."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def figure(height: float, title: str, scope: str, panels: int = 1, **kwargs) -> tuple[Figure, np.ndarray]:
    """A page-wide figure of `panels` axes in a row, titled with what it shows and what it is measured on."""
    fig, axes = plt.subplots(1, panels, figsize=(WIDTH, height), squeeze=False, layout="constrained", **kwargs)
    fig.suptitle(f"{title}\n{scope}", fontsize=11)
    return fig, axes[0]


def storage_bars(names: Sequence[str], stored_bytes: Sequence[int], scope: str) -> bytes:
    fig, [ax] = figure(0.2 * len(names) + 1.2, "Bytes stored per array", scope)
    ax.barh(list(names), [max(b, 1) for b in stored_bytes], color="tab:blue")
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("bytes stored (log scale)")
    return png(fig)


def teacher_views(rows: Sequence[dict[str, float]], scope: str) -> bytes:
    views = np.array([r["view"] for r in rows])
    fig, [ax] = figure(3.2, "Teacher per stored view", scope)
    for offset, key, label in ((-0.2, "accuracy", "top-1 accuracy"), (0.2, "confidence", "mean max probability")):
        values = [r[key] for r in rows]
        bars = ax.bar(views + offset, values, width=0.4, label=label)
        ax.bar_label(bars, [f"{v:.1%}" for v in values], fontsize=8)
    ax.set_xticks(views, [f"view {v}" + (" (clean)" if v == 0 else "") for v in views])
    ax.set_ylim(0, 1.12)
    ax.legend(loc="lower right")
    return png(fig)


def pca_curve(ratio: np.ndarray, reach: dict[float, int], scope: str) -> bytes:
    """Cumulative explained variance with the component counts reaching each fraction in `reach`."""
    fig, [ax] = figure(3.4, "PCA: cumulative explained variance", scope)
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
    return png(fig)


def cka_heatmap(cka: CkaSummary, scope: str) -> bytes:
    """The interrelations with the diagonal (1 by definition) masked, so the colour scale spans the
    off-diagonal values WKD-L uses; the strongest pairs outlined, and named in a bar panel beside it."""
    c = len(cka.class_names)
    fig, (heat, bars) = figure(6.0, f"CKA category interrelations ({cka.source})", scope, panels=2,
                               width_ratios=[1.1, 1])
    off = np.where(np.eye(c, dtype=bool), np.nan, cka.ir)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#e6e6e6")
    image = heat.imshow(off, cmap=cmap, vmin=float(np.nanmin(off)), vmax=float(np.nanmax(off)))
    fig.colorbar(image, ax=heat, fraction=0.046, pad=0.03, label="interrelation (diagonal masked: 1)")
    index = {name: i for i, name in enumerate(cka.class_names)}
    for a, b, _ in cka.top_pairs:
        for y, x in ((index[a], index[b]), (index[b], index[a])):
            heat.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, ec=PAIR_COLOUR, lw=1.5))
    if c <= MAX_LABELLED_CLASSES:
        heat.set_xticks(range(c), cka.class_names, rotation=60, ha="right", fontsize=8)
        heat.set_yticks(range(c), cka.class_names, fontsize=8)
    heat.set_title("pairs outlined in red: the strongest", fontsize=9)
    labels = [f"{a} / {b}" for a, b, _ in cka.top_pairs]
    values = [v for _, _, v in cka.top_pairs]
    drawn = bars.barh(labels, values, color=PAIR_COLOUR)
    bars.bar_label(drawn, [f"{v:.3f}" for v in values], fontsize=8, padding=2)
    bars.invert_yaxis()
    bars.set_xlabel("interrelation")
    bars.set_title(f"the {len(values)} most related class pairs", fontsize=9)
    return png(fig)


def gaussian_channels(stats: GaussianStats, scope: str) -> bytes:
    """Per-channel averages as sorted curves (how spread the channels are) and one point per channel
    (whether strongly active channels also vary most)."""
    fig, (curves, scatter) = figure(3.6, f"Gaussian statistics of {len(stats.channel_mean)} channels", scope,
                                    panels=2)
    rank = np.arange(1, len(stats.channel_mean) + 1)
    curves.plot(rank, np.sort(stats.channel_mean), label="mean of cell means")
    curves.plot(rank, np.sort(stats.channel_std), label="mean of cell stds")
    curves.set_xlabel("channel rank (each curve sorted ascending)")
    curves.legend()
    curves.grid(alpha=0.3)
    scatter.scatter(stats.channel_mean, stats.channel_std, s=8, alpha=0.6)
    scatter.set_xlabel("mean of cell means")
    scatter.set_ylabel("mean of cell stds")
    scatter.set_title("one point per channel", fontsize=9)
    scatter.grid(alpha=0.3)
    return png(fig)


def lsh_information(lsh: LshSummary, scope: str) -> bytes:
    """What the codes carry about the classes: k-NN accuracy and neighbour agreement against the number of
    bits used, and the Hamming distances of same-class against different-class pairs."""
    fig, (curve, hist) = figure(3.8, f"LSH codes ({lsh.bits} bits of a {lsh.dim}-d feature)", scope, panels=2)
    bits = list(lsh.by_bits)
    curve.plot(bits, [s.accuracy for s in lsh.by_bits.values()], "o-", label=f"{lsh.knn.k}-NN accuracy")
    curve.plot(bits, [s.agreement for s in lsh.by_bits.values()], "s-", label="neighbour label agreement")
    curve.axhline(lsh.chance, color="grey", ls="--", lw=0.8, label="most frequent class")
    curve.set_xscale("log", base=2)
    curve.set_xticks(bits, [str(b) for b in bits])
    curve.set_ylim(0, 1.02)
    curve.set_xlabel("bits used (the first b of each code)")
    curve.legend(loc="lower right", fontsize=8)
    curve.grid(alpha=0.3)
    edges = np.arange(lsh.bits + 2) - 0.5
    # One filled outline per histogram: a bar per distance would be hundreds of patches to draw at 256 bits.
    hist.hist(lsh.same_class, bins=edges, density=True, histtype="stepfilled", alpha=0.6, label="same class")
    hist.hist(lsh.other_class, bins=edges, density=True, histtype="stepfilled", alpha=0.6, label="different classes")
    hist.set_xlabel(f"Hamming distance between two codes (of {lsh.bits} bits)")
    hist.set_ylabel("share of pairs")
    hist.set_title(f"same-class pair closer: {lsh.separation:.1%} of the time (0.5: no information)", fontsize=9)
    hist.legend(fontsize=8)
    return png(fig)


def sample_grid(samples: SampleViews, scope: str) -> bytes:
    """Samples across, views down (teacher's top class and probability under each; red when wrong)."""
    s, v = samples.images.shape[:2]
    height = WIDTH / s * v * 1.1 + 0.8
    fig, axes = plt.subplots(v, s, figsize=(WIDTH, height), squeeze=False)
    # Fixed margins (in inches, as fractions): a constrained layout of S x V image axes costs seconds.
    fig.subplots_adjust(left=0.4 / WIDTH, right=1 - 0.1 / WIDTH, top=1 - 0.7 / height, bottom=0.3 / height,
                        wspace=0.08, hspace=0.25)
    fig.suptitle(f"Stored views, re-rendered (teacher's top class below; red: wrong)\n{scope}", fontsize=11)
    for i in range(s):
        for j in range(v):
            ax = axes[j, i]
            image = samples.images[i, j]
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if samples.predictions is not None:
                name, p = samples.predictions[i][j]
                ax.set_xlabel(f"{name} {p:.0%}", fontsize=9, color="black" if name == samples.labels[i] else "red")
            if j == 0:
                ax.set_title(f"id {samples.ids[i]}: {samples.labels[i]}", fontsize=9)
            if i == 0:
                ax.set_ylabel(f"view {j}" + (" (clean)" if j == 0 else ""), fontsize=9)
    return png(fig)


def accuracy_vs_time(labels: Sequence[str], seconds: Sequence[float], seconds_std: Sequence[float],
                     accuracy: Sequence[float], accuracy_std: Sequence[float]) -> bytes:
    """Student runs: validation accuracy (given as fractions, drawn in percent like every table) against
    training time, one point per group (mean +- std)."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for i, label in enumerate(labels):
        ax.errorbar(seconds[i], 100 * accuracy[i], xerr=seconds_std[i], yerr=100 * accuracy_std[i], fmt="o",
                    capsize=3, label=label)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("Students: accuracy vs training time")
    return png(fig)
