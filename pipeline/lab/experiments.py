"""Named experiments: the scenarios behind the demo and the README's results tables.

An experiment is the whole job end to end, as a user would run it (docs/ARCHITECTURE.md#data-flow): fit a teacher (or
reuse one fitted with the same settings), cache it once, then train one student architecture with
several method combinations and seeds from that single cache. `distillery experiment NAME` runs one: as the
`experiment` flow (`flows.experiments`) when a Prefect server records runs, else here in the command's own
process (`run_here`); both take the same steps (`run_steps`). The table it prints is what the README shows,
next to that command.

Layout under the experiments root (default `runs/experiments`):

    teachers/<dataset>-<model>-e<epochs>.pt      shared by every experiment with that teacher
    <name>/cache                                 the experiment's teacher cache
    <name>/runs/<row>-s<seed>                    one student run directory per row and seed
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from pipeline.teacher.plan import CacheRequest
from pipeline.teacher.cache_pass import CacheResult
from pipeline.train.fit import FitConfig
from pipeline.train.config import RunSettings, StudentSpec
from pipeline.train.layout import run_dir_name
from pipeline.train.optim import OptimConfig
from pipeline.train.rundir import RunDir
from pipeline.train.summary import TrainSummary
from pipeline.errors import DistilleryError
from pipeline.options import default_of

DEFAULT_ROOT = "runs/experiments"
"""Where `distillery experiment` keeps teachers, caches and runs unless told otherwise."""

# Fit settings that change the teacher's weights; a checkpoint fitted with the same ones is reused.
_FIT_IDENTITY = ("dataset", "model", "epochs", "subset", "seed", "input_size", "patch_size", "batch_size", "lr",
                 "weight_decay", "label_smoothing", "objective", "temperature", "jitter")
_SSL_ONLY = ("temperature", "jitter")
_BEFORE_IT_EXISTED = {"jitter": 0.0}  # ssl teachers fitted before the colour distortion had none


class ExperimentError(DistilleryError):
    """An experiment that does not exist or cannot run as asked."""


@dataclass(frozen=True)
class Experiment:
    """One scenario: a teacher, a cache of `labelled` samples, a student trained with each row's methods."""

    name: str
    description: str
    dataset: str
    teacher: str
    teacher_epochs: int
    labelled: int | None  # stratified subset of the train split the cache (and so the students) hold
    views: int  # augmented views per sample besides the clean view 0
    student: str
    epochs: int
    rows: dict[str, tuple[str, ...]]  # row label -> the run's method specs
    cache_options: dict[str, Any] = field(default_factory=dict)  # further CacheRequest fields (tap, lsh_bits, ...)
    batch_size: int = 64
    lr: float = 2e-3
    eval_every: int = 1
    teacher_objective: str = "supervised"  # `fit-teacher --objective`: ssl never sees a label
    teacher_fit: dict[str, Any] = field(default_factory=dict)  # further FitConfig fields (subset, patch_size, ...)

    def select(self, rows: list[str] | None) -> Experiment:
        """This experiment with only `rows` (all when None or empty); an unknown row is an ExperimentError."""
        if not rows:
            return self
        unknown = sorted(set(rows) - self.rows.keys())
        if unknown:
            raise ExperimentError(f"experiment {self.name!r} has no row {', '.join(map(repr, unknown))}; rows: "
                                  f"{', '.join(self.rows)}")
        return replace(self, rows={label: m for label, m in self.rows.items() if label in rows})

    def teacher_path(self, root: Path) -> Path:
        objective = "" if self.teacher_objective == "supervised" else f"-{self.teacher_objective}"
        # Further fit settings name their own file: a teacher shared by experiments is refitted by none of them.
        settings = "".join(f"-{key}{value}" for key, value in sorted(self.teacher_fit.items()))
        return (root / "teachers" /
                f"{self.dataset.split(':')[0]}-{self.teacher}-e{self.teacher_epochs}{objective}{settings}.pt")

    def fit_config(self, root: Path) -> FitConfig:
        # overwrite: the experiment's own teacher, refitted when its settings changed (`reusable_teacher`)
        return FitConfig(dataset=self.dataset, model=self.teacher, out=str(self.teacher_path(root)),
                         epochs=self.teacher_epochs, objective=self.teacher_objective, overwrite=True,
                         **self.teacher_fit)

    def cache_request(self, root: Path) -> CacheRequest:
        return CacheRequest(dataset=self.dataset, teacher=self.teacher, checkpoint=str(self.teacher_path(root)),
                            out=str(root / self.name / "cache"), subset=self.labelled, views=self.views,
                            **self.cache_options)

    def run_settings(self, seed: int, run: Path) -> RunSettings:
        # Resuming a student run directory (`student_run`) that holds a run keeps a finished run as it is and continues an interrupted
        # one, so a rerun of the experiment only trains what is missing.
        return RunSettings(epochs=self.epochs, seed=seed, batch_size=self.batch_size, optim=OptimConfig(lr=self.lr),
                           eval_every=self.eval_every, resume=RunDir(run).holds_run())

    def run_dir(self, root: Path, row: str, seed: int) -> Path:
        """The row's `--out`: its one student trains in a subdirectory, as every student does."""
        return root / self.name / "runs" / f"{row}-s{seed}"

    def student_run(self, root: Path, row: str, seed: int) -> Path:
        """Where the row's student run is (docs/ARCHITECTURE.md#command-line-contract): in `run_dir`, or
        `run_dir` itself where an earlier version wrote the run straight into it."""
        out = self.run_dir(root, row, seed)
        return out if RunDir(out).holds_run() else out / run_dir_name(self.student, self.rows[row], seed)


def suite_parts(name: str, rows: list[str] | None = None) -> list[Experiment]:
    """The experiments `distillery experiment NAME` runs: a suite's parts (each with the suite's rows, or only
    those of `rows` it has), else the one experiment NAME. A row no part has is an ExperimentError."""
    if name not in SUITES:
        return [get_experiment(name).select(rows)]
    parts = [replace(get_experiment(part), rows={r: m for r, m in get_experiment(part).rows.items() if r in keep})
             for part, keep in SUITES[name]]
    if rows:
        unknown = sorted(set(rows) - {r for part in parts for r in part.rows})
        if unknown:
            raise ExperimentError(f"experiment {name!r} has no row {', '.join(map(repr, unknown))}")
        parts = [replace(part, rows={r: m for r, m in part.rows.items() if r in rows}) for part in parts]
    return [part for part in parts if part.rows]


def reusable_teacher(checkpoint_config: dict[str, Any] | None, wanted: FitConfig) -> bool:
    """Whether a checkpoint fitted with `checkpoint_config` is the teacher `wanted` would fit."""
    if checkpoint_config is None:
        return False
    # A checkpoint fitted before a setting existed was fitted with that setting's default, or with what the
    # setting's arrival changed; a supervised fit never read the ssl-only settings.
    keys = [k for k in _FIT_IDENTITY if wanted.objective == "ssl" or k not in _SSL_ONLY]
    return all(checkpoint_config.get(k, _BEFORE_IT_EXISTED.get(k, default_of(FitConfig, k))) == getattr(wanted, k)
               for k in keys)


class ResultRow(BaseModel):
    """One method combination of an experiment: val accuracy (%) mean and sample std over the seeds, each
    seed's accuracy as text, the mean training time per run (s) and the mean step time (ms)."""

    model_config = ConfigDict(frozen=True)

    methods: str
    accuracy: float
    std: float
    seeds: str  # "80.00 / 82.00": each seed's accuracy, in seed order
    train_s: float
    step_ms: float


class ExperimentTeacher(BaseModel):
    """An experiment's teacher: its checkpoint, whether an earlier fit was reused, its val accuracy (None when it
    has no trained head)."""

    model_config = ConfigDict(frozen=True)

    out: str
    reused: bool
    val_accuracy: float | None


class ExperimentResult(BaseModel):
    """What `distillery experiment` reports: the teacher, the teacher pass, and a row per method combination."""

    model_config = ConfigDict(frozen=True)

    teacher: ExperimentTeacher
    cache: CacheResult
    rows: list[ResultRow]


def result_rows(experiment: Experiment, summaries: dict[str, list[TrainSummary]]) -> list[ResultRow]:
    """One row per method combination: accuracy mean and sample std over seeds, each seed's accuracy,
    mean training time per run and mean step time (the summaries of one row, in seed order)."""
    rows = []
    for label in experiment.rows:
        runs = summaries.get(label, [])
        if not runs:
            continue
        acc = [100 * r.val_accuracy for r in runs]
        rows.append(ResultRow(
            methods=label,
            accuracy=statistics.fmean(acc),
            std=statistics.stdev(acc) if len(acc) > 1 else 0.0,
            seeds=" / ".join(f"{a:.2f}" for a in acc),
            train_s=statistics.fmean(r.train_seconds for r in runs),
            step_ms=1000 * statistics.fmean(r.mean_step_seconds for r in runs),
        ))
    return rows


def fit_or_reuse_teacher(experiment: Experiment, root: Path) -> ExperimentTeacher:
    """The experiment's teacher checkpoint: reused when fitted with the same settings, else fitted now."""
    from pipeline.teacher.checkpoint import TeacherCheckpoint
    from pipeline.train.fit import fit_teacher

    config = experiment.fit_config(root)
    path = Path(config.out)
    fitted_before = TeacherCheckpoint.load(path) if path.exists() else None
    if fitted_before is not None and reusable_teacher(fitted_before.config, config):
        return ExperimentTeacher(out=str(path), reused=True, val_accuracy=fitted_before.val_accuracy)
    fitted = fit_teacher(config)
    return ExperimentTeacher(out=fitted.out, reused=False, val_accuracy=fitted.val_accuracy)


TrainStep = Callable[[str, StudentSpec, Path, RunSettings, str], TrainSummary]
"""(cache, student, the row's --out, settings, sweep name) -> the run's summary."""


def run_steps(experiment: Experiment, seeds: list[int], root: Path, teacher: Callable[[], ExperimentTeacher],
              cache: Callable[[CacheRequest], CacheResult], train: TrainStep) -> ExperimentResult:
    """The experiment's steps in order, each done by the callable given (the flow's tasks and sub-flows, or
    the library in this process): the teacher, its cache, then every row once per seed from that cache."""
    fitted = teacher()
    cached = cache(experiment.cache_request(root))
    summaries: dict[str, list[TrainSummary]] = {label: [] for label in experiment.rows}
    for seed in seeds:
        for label, methods in experiment.rows.items():
            settings = experiment.run_settings(seed, experiment.student_run(root, label, seed))
            summaries[label].append(train(cached.cache, StudentSpec(student=experiment.student, methods=methods),
                                          experiment.run_dir(root, label, seed), settings,
                                          f"{experiment.name}-{label}"))
    return ExperimentResult(teacher=fitted, cache=cached, rows=result_rows(experiment, summaries))


def run_here(experiment: Experiment, seeds: list[int], root: Path) -> ExperimentResult:
    """`run_steps` in this process, without Prefect (`distillery experiment` with no server to record it): a stop
    request (Ctrl-C, SIGTERM) ends the teacher pass before its next batch and a student before its next step,
    and a rerun resumes both."""
    from pipeline.cache.reader import TeacherCache
    from pipeline.report.html import write_cache_report
    from pipeline.stop import polled
    from pipeline.teacher.cache_pass import run_cache_pass
    from pipeline.train.layout import plan_runs
    from pipeline.train.loop import check_runs, train_student

    def cache(request: CacheRequest) -> CacheResult:
        result = run_cache_pass(request)
        write_cache_report(TeacherCache(result.cache))
        return result

    def train(cache: str, student: StudentSpec, out: Path, settings: RunSettings, sweep: str) -> TrainSummary:
        [config] = plan_runs(cache, [student], str(out), settings)
        check_runs([config])
        with polled():
            return train_student(config)

    return run_steps(experiment, seeds, root, lambda: fit_or_reuse_teacher(experiment, root), cache, train)


@dataclass(frozen=True)
class PairedDifference:
    """Row a minus row b over the same seeds: mean and sample std of the per-seed differences, the paired t
    statistic mean / (std / sqrt(n)), and on how many of the n seeds a is above b."""

    mean: float
    std: float
    t: float
    above: int
    n: int


def paired_difference(a: list[float], b: list[float]) -> PairedDifference:
    """The seed-paired comparison of two rows' accuracies (both in seed order). A seed fixes the student's
    initialisation, data order and views, so differences per seed remove most of the seed-to-seed spread
    that the rows share (Student's paired t-test)."""
    if len(a) != len(b) or len(a) < 2:
        raise ExperimentError(f"a paired difference needs the same 2 or more seeds in both rows, got {len(a)} "
                              f"and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    if std > 0:
        t = mean / (std / math.sqrt(len(diffs)))
    else:  # every seed moved by the same amount
        t = math.copysign(math.inf, mean) if mean else math.nan
    return PairedDifference(mean=mean, std=std, t=t, above=sum(d > 0 for d in diffs), n=len(diffs))


def results_markdown(rows: list[ResultRow]) -> str:
    """The README form of `result_rows`."""
    lines = ["| methods | accuracy % (mean ± std) | per seed | train s / run | ms / step |",
             "|---|---|---|---|---|"]
    lines += [f"| {r.methods} | {r.accuracy:.2f} ± {r.std:.2f} | {r.seeds} | {r.train_s:.0f} | {r.step_ms:.1f} |"
              for r in rows]
    return "\n".join(lines)


# CIFAR-style WKD-F settings (G = 1, w_F = 0.08, gamma = 4; docs/methods.md#wkd-f) on the student's 2x2 stage.
WKD_F_LAYER3 = "wkd_f:stage=-2,weight=0.08,gamma=4"
# ScaleKD mimics the cached layer3 maps (2x2) with the student's 2x2 stage -2: its 1x1 deepest map could not
# vary over the teacher's positions (the method refuses it).
SCALEKD_LAYER3 = "scalekd:stage=-2"
# TCS as first shipped (pruned to half of k, raw targets, no floor on k): the rows issue 17 measured.
TCS_FIRST_DEFAULTS = "tcs:keep=0.5,norm=none,min_dims=0"
# TCS whose alignment weight decays to 0 over training (README, "What we tried for TCS").
TCS_DECAY = "tcs:decay=true"
_FMNIST_COMMON = dict(dataset="fashion-mnist", teacher="resnet10t", teacher_epochs=6, student="test_resnet")

# From a self-supervised teacher: CE on the same cache (it never reads the teacher) beside TCS's rows.
_SSL_ROWS = {"ce": ("ce",), "ce+tcs": ("ce", "tcs"), "ce+tcs+elsh": ("ce", "tcs", "elsh"),
             "ce+tcs(decay)": ("ce", TCS_DECAY)}

EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    Experiment(
        name="digits-demo",
        description="the demo: a resnet10t teacher fitted on all 1,437 training digits; a test_resnet student "
                    "that sees a stratified 300 of them (5 views each), CE alone vs CE + KD from the cache",
        dataset="digits", teacher="resnet10t", teacher_epochs=20, labelled=300, views=4, student="test_resnet",
        epochs=20, rows={"ce": ("ce",), "ce+kd": ("ce", "kd")}),
    Experiment(
        name="fmnist-5k",
        description="Fashion-MNIST: a resnet10t teacher fitted on the full 60k train split; a test_resnet student "
                    "(0.37 M parameters) trained on a stratified 5,000-sample subset (5 cached views each); "
                    "accuracy on the 10k test split",
        labelled=5000, views=4, epochs=10, eval_every=10,
        # At 32 px the deepest maps are 1x1: Gaussians and feature maps come from layer3 (2x2, `tap` auto),
        # which is the student's stage -2 too.
        cache_options=dict(featmaps=True, teacher_tail=1, lsh_bits=256),
        rows={"ce": ("ce",), "ce+kd": ("ce", "kd"), "ce+dkd": ("ce", "dkd:warmup=5"),
              "ce+fitnet": ("ce", "fitnet"), "ce+wkd_l": ("ce", "wkd_l"),
              "ce+wkd_f": ("ce", WKD_F_LAYER3), "ce+wkd_l+wkd_f": ("ce", "wkd_l", WKD_F_LAYER3),
              "ce+tcs": ("ce", "tcs"), "ce+tcs+elsh": ("ce", "tcs", "elsh"), "ce+tcs(decay)": ("ce", TCS_DECAY),
              "ce+tcs(first defaults)": ("ce", TCS_FIRST_DEFAULTS),
              "ce+scalekd": ("ce", SCALEKD_LAYER3), "ce+scalekd(tpp)": ("ce", f"{SCALEKD_LAYER3},tpp=true")},
        **_FMNIST_COMMON),
    Experiment(
        name="fmnist-fewshot",
        description="Fashion-MNIST few-shot: the same resnet10t teacher (fitted on the 60k train split); a cache "
                    "and a test_resnet student over 10 labelled samples per class (100 in all, 5 views each); "
                    "accuracy on the 10k test split",
        labelled=100, views=4, epochs=100, eval_every=25, batch_size=32, cache_options=dict(lsh_bits=256),
        rows={"ce": ("ce",), "ce+kd": ("ce", "kd"), "ce+tcs": ("ce", "tcs"), "ce+tcs+elsh": ("ce", "tcs", "elsh"),
              "ce+tcs(decay)": ("ce", TCS_DECAY), "ce+tcs(first defaults)": ("ce", TCS_FIRST_DEFAULTS)},
        **_FMNIST_COMMON),
    Experiment(
        name="fmnist-5k-ssl",
        description="fmnist-5k's student, cache subset and views, distilled from a resnet10t that never saw a label "
                    "(`fit-teacher --objective ssl`, SimCLR NT-Xent, 6 epochs on the 60k train split; head-less "
                    "cache); accuracy on the 10k test split",
        labelled=5000, views=4, epochs=10, eval_every=10, teacher_objective="ssl",
        cache_options=dict(teacher_head=False, lsh_bits=256),
        rows=_SSL_ROWS, **_FMNIST_COMMON),
    Experiment(
        name="fmnist-fewshot-ssl",
        description="fmnist-fewshot's student and 100 labelled samples, distilled from the self-supervised resnet10t "
                    "of fmnist-5k-ssl (head-less cache); accuracy on the 10k test split",
        labelled=100, views=4, epochs=100, eval_every=25, batch_size=32, teacher_objective="ssl",
        cache_options=dict(teacher_head=False, lsh_bits=256),
        rows=_SSL_ROWS, **_FMNIST_COMMON),
)}

# Cross-architecture (docs/results.md#cross-architecture): the methods' seed claims are about teachers of another
# architecture than the student. Sized for a 2-core CPU shared with other jobs: a stratified 1,000-sample cache
# (one augmented view each), 3 student epochs, teachers fitted on a stratified 3,000-sample subset for 4 epochs.
_XARCH_COMMON = dict(dataset="fashion-mnist", labelled=1000, views=1, epochs=3, eval_every=3, teacher_epochs=4,
                     cache_options=dict(featmaps=True, teacher_tail=1))
# A ViT teacher at 32 px in patches of 8: 4x4 tokens (64 wide), the deepest block's token map cached for ScaleKD
# and WKD-F (docs/methods.md#scalekd-in-practice); the CNN students mimic it with their 2x2 stage -2.
_VIT_TEACHER = dict(teacher="test_vit", teacher_fit=dict(patch_size=8, subset=3000))
_VIT_TO_CNN_ROWS = {"ce": ("ce",), "ce+kd": ("ce", "kd"), "ce+dkd": ("ce", "dkd:warmup=1"),
                    "ce+wkd_l+wkd_f": ("ce", "wkd_l", WKD_F_LAYER3), "ce+scalekd": ("ce", SCALEKD_LAYER3),
                    "ce+scalekd(tpp)": ("ce", f"{SCALEKD_LAYER3},tpp=true"), "ce+tcs": ("ce", "tcs")}
EXPERIMENTS.update({e.name: e for e in (
    Experiment(
        name="xarch-vit-test_resnet",
        description="cross-architecture: a ViT teacher (timm test_vit, patch 8 at 32 px: 4x4 tokens, 0.26 M "
                    "parameters) fitted on a stratified 3,000 Fashion-MNIST training images for 4 epochs; a "
                    "test_resnet student (0.37 M) on a stratified 1,000 (1 cached view each), 3 epochs; accuracy "
                    "on the 10k test split",
        student="test_resnet", rows=_VIT_TO_CNN_ROWS, **_VIT_TEACHER, **_XARCH_COMMON),
    Experiment(
        name="xarch-cnn-vit",
        description="cross-architecture the other way: a test_resnet teacher (0.37 M parameters) fitted on a "
                    "stratified 3,000 Fashion-MNIST training images for 4 epochs; a ViT student (timm test_vit, "
                    "patch 16 at 32 px: 2x2 tokens, 0.27 M) on a stratified 1,000 (1 cached view each), 3 epochs; "
                    "accuracy on the 10k test split",
        teacher="test_resnet", teacher_fit=dict(subset=3000), student="test_vit",
        # Every block of the ViT student is a 2x2 token map, the size of the teacher's cached layer3 maps.
        rows={"ce": ("ce",), "ce+kd": ("ce", "kd"), "ce+dkd": ("ce", "dkd:warmup=1"),
              "ce+wkd_l+wkd_f": ("ce", "wkd_l", "wkd_f:weight=0.08,gamma=4"), "ce+scalekd": ("ce", "scalekd"),
              "ce+scalekd(tpp)": ("ce", "scalekd:tpp=true"), "ce+tcs": ("ce", "tcs")},
        **_XARCH_COMMON),
    Experiment(
        name="xarch-vit-resnet18",
        description="cross-architecture: xarch-vit-test_resnet's ViT teacher and sizes, a resnet18 student "
                    "(11.2 M parameters)",
        student="resnet18", rows=_VIT_TO_CNN_ROWS, **_VIT_TEACHER, **_XARCH_COMMON),
)})

_TCS_ROWS = ("ce", "ce+kd", "ce+tcs", "ce+tcs+elsh", "ce+tcs(decay)")
# Suites: one command for a table drawn from several experiments (each keeps its own teacher, cache and runs, so
# rows it shares with another command are trained once).
SUITES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "tcs": (("fmnist-5k", _TCS_ROWS), ("fmnist-5k-ssl", _TCS_ROWS),
            ("fmnist-fewshot", _TCS_ROWS), ("fmnist-fewshot-ssl", _TCS_ROWS)),
    "xarch": tuple((part, tuple(EXPERIMENTS[part].rows))
                   for part in ("xarch-vit-test_resnet", "xarch-cnn-vit", "xarch-vit-resnet18")),
}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ExperimentError(f"unknown experiment {name!r}; known: {', '.join(sorted([*EXPERIMENTS, *SUITES]))}")
    return EXPERIMENTS[name]
