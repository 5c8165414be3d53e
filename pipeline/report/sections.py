"""The report as titled sections of text lines and tables: what the HTML page and the markdown artifact share."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.cache.summary import human_bytes
from pipeline.report.content import CacheReport, storage_lines


@dataclass
class Section:
    key: str  # names the section's figure, if it has one
    title: str
    lines: list[tuple[str, str]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    note: str | None = None  # why the section has nothing to show
    scope: str | None = None  # what its figure is measured on: split and view

    @property
    def empty(self) -> bool:
        return self.note is not None


HELD_OUT = {True: "held out from the teacher", False: "the teacher's training data",
            None: "whether the teacher trained on it is not recorded"}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def storage_section(report: CacheReport) -> Section:
    rows = [[r.name, "x".join(map(str, r.shape)), r.dtype, human_bytes(r.stored_bytes),
             f"{r.bytes_per_sample:.1f}" if r.bytes_per_sample else "-", _fmt(r.mean), _fmt(r.std)]
            for r in report.arrays]
    return Section("storage", "Storage", lines=storage_lines(report.storage),
                   scope=f"{report.split}, every sample and stored view",
                   columns=["array", "shape", "dtype", "stored", "bytes/sample", "mean", "std"], rows=rows)


def teacher_section(report: CacheReport) -> Section:
    if not report.teacher:
        return Section("teacher", "Teacher accuracy per view", note=report.notes.get("teacher"))
    p = report.provenance
    lines = [("measured on", p.measured_on), ("teacher trained on", p.trained_on)]
    return Section("teacher", "Teacher accuracy per view", lines=lines, columns=["view", "accuracy", "confidence"],
                   scope=f"{report.split} ({HELD_OUT[p.held_out]}), every stored view",
                   rows=[[str(r["view"]), f"{r['accuracy']:.2%}", f"{r['confidence']:.3f}"] for r in report.teacher])


def pca_section(report: CacheReport) -> Section:
    ratio = report.pca_ratio
    if ratio is None:
        return Section("pca", "PCA of pooled features", note=report.notes.get("pca"))
    lines = [(f"components for {f:.0%} of the variance", f"{n} of {len(ratio)}") for f, n in report.pca_reach.items()]
    lines.append(("variance in the first 10 components", f"{ratio[min(9, len(ratio) - 1)]:.2%}"))
    return Section("pca", "PCA of pooled features", lines=lines, scope=f"{report.split}, view 0 pooled features")


def cka_section(report: CacheReport) -> Section:
    cka = report.cka
    if cka is None:
        return Section("cka", "CKA category interrelations", note=report.notes.get("cka"))
    off = cka.ir[~np.eye(len(cka.ir), dtype=bool)]
    lines = [("source", cka.source), ("off-diagonal mean", f"{off.mean():.4f}" if off.size else "-")]
    return Section("cka", "CKA category interrelations", lines=lines, scope=f"{report.split}, view 0 {cka.source}",
                   columns=["class", "class", "interrelation"],
                   rows=[[a, b, f"{v:.4f}"] for a, b, v in cka.top_pairs])


def gaussian_section(report: CacheReport) -> Section:
    g = report.gaussian
    if g is None:
        return Section("gaussian", "Gaussian statistics", note=report.notes.get("gaussian"))
    lines = [("tap, grid", f"{g.tap}, {g.grid}x{g.grid} cells"), ("channels", str(len(g.channel_mean)))]
    for name, values in (("mean of cell means", g.channel_mean), ("mean of cell stds", g.channel_std)):
        lines.append((name, f"average {values.mean():.4g}, range [{values.min():.4g}, {values.max():.4g}]"))
    return Section("gaussian", "Gaussian statistics", lines=lines,
                   scope=f"{report.split}, view 0 {g.tap} maps, {g.grid}x{g.grid} cells")


def lsh_section(report: CacheReport) -> Section:
    lsh = report.lsh
    if lsh is None:
        return Section("lsh", "LSH codes", note=report.notes.get("lsh"))
    knn = lsh.knn
    return Section("lsh", "LSH codes", scope=f"{report.split}, view 0 codes", lines=[
        ("bits, feature dim", f"{lsh.bits}, {lsh.dim}"),
        (f"{knn.k}-NN accuracy (Hamming, leave-one-out)",
         f"{knn.accuracy:.2%} over {knn.queries} queries among {lsh.searched} codes (most frequent class: "
         f"{lsh.chance:.2%})"),
        ("neighbour label agreement", f"{knn.agreement:.2%} of the {knn.k} nearest codes share the query's class"),
        ("same-class pair closer than a different-class pair", f"{lsh.separation:.2%} of the time (0.5: no "
                                                               f"information), over {len(lsh.same_class)} pairs each"),
        ("bit balance", f"share of set bits in [{lsh.ones_fraction.min():.3f}, {lsh.ones_fraction.max():.3f}] "
                        f"(0.5 by construction: median thresholds)")],
        columns=["bits used", f"{knn.k}-NN accuracy", "neighbour agreement"],
        rows=[[str(b), f"{s.accuracy:.2%}", f"{s.agreement:.2%}"] for b, s in lsh.by_bits.items()])


def samples_section(report: CacheReport) -> Section:
    if report.samples is None:
        return Section("samples", "Views", note=report.notes.get("samples"))
    s = report.samples
    scope = f"{report.split}, the first sample of {len(s.ids)} classes, every stored view"
    return Section("samples", "Views", scope=scope,
                   lines=[("samples", ", ".join(f"id {i} ({c})" for i, c in zip(s.ids, s.labels))),
                          ("views", str(s.images.shape[1]))])


def report_sections(report: CacheReport) -> list[Section]:
    return [Section("overview", "Manifest", lines=report.overview), storage_section(report), teacher_section(report),
            pca_section(report), cka_section(report), gaussian_section(report), lsh_section(report),
            samples_section(report)]
