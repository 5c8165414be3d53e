"""`distillery runs`: compare student runs, grouping runs that differ only by their seed (docs/ARCHITECTURE.md#command-line-contract).

A run directory holds `summary.json` (the result) and `config.json` (the `TrainConfig`); `distillery train
--out OUT` writes one per student, `OUT/<student>-<methods>-s<seed>/`, and earlier versions wrote a lone
student's straight into OUT: both are found (`find_runs`). Two runs belong
to one group when their configs are equal but for the seed and what never changes a result (the run
directory, the device, --resume): `TrainConfig.identity()` without the seed. A run without config.json
is grouped by the setup its summary records (student, methods, epochs, cache, online_teacher, ...).
Each group reports the mean and (sample) standard deviation of its measurements over its seeds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from pipeline.bounded import read_json
from pipeline.errors import DistilleryError
from pipeline.object_store import ObjectPath, location
from pipeline.train.config import TrainConfig, TrainError
from pipeline.train.layout import run_dir_name
from pipeline.train.rundir import CONFIG, SUMMARY


class Measures(BaseModel):
    """One statistic (mean or std over a group's seeds) of each measurement a run's summary records."""

    model_config = ConfigDict(frozen=True)

    val_accuracy: float
    train_seconds: float
    mean_step_seconds: float
    peak_rss_bytes: float


MEASURES = tuple(Measures.model_fields)
# The setup a summary records, for runs without config.json.
SUMMARY_SETUP = ("student", "methods", "epochs", "cache", "online_teacher", "teacher", "dataset", "num_samples",
                 "input_size", "batch_size")


GROUPINGS = ("config", "date", "flow-run")
"""How `distillery runs --by` groups: runs that differ only by seed (config); that, per day the run finished
(date: one row per night of a nightly sweep, so a regression shows as a trend); or per --out the run was trained
into (flow-run: `Run.out`, which a deployment names after its flow run)."""


@dataclass(frozen=True)
class Run:
    path: Path | ObjectPath
    summary: dict[str, Any]
    setup: dict[str, Any]  # flat, dotted keys: what must be equal for two runs to be seeds of one group

    @property
    def finished(self) -> str:
        """The UTC day the run finished: its summary's `finished_at`, else the day summary.json was written."""
        stamp = self.summary.get("finished_at")
        if isinstance(stamp, str) and len(stamp) >= 10:
            return stamp[:10]
        if isinstance(self.path, Path):
            mtime = (self.path / SUMMARY).stat().st_mtime
            return datetime.fromtimestamp(mtime, timezone.utc).date().isoformat()
        return "unknown"

    def group(self, by: str) -> str:
        """The value of grouping `by` (`GROUPINGS`) for this run: "" for config."""
        return {"config": "", "date": self.finished, "flow-run": self.out.name}[by]

    @property
    def out(self) -> Path | ObjectPath:
        """The --out this run was trained into: the folder holding a student's run directory, or the run
        directory itself when it is not named as `run_dir_name` names one (written straight into --out before
        every student got its own subdirectory)."""
        named = run_dir_name(self.summary["student"], self.summary["methods"], self.summary["seed"])
        return self.path.parent if self.path.name == named else self.path


@dataclass(frozen=True)
class RunGroup:
    setup: dict[str, Any]
    runs: list[Run]
    group: str = ""  # the day or folder of `group_runs(by=...)`; "" grouping by config

    @property
    def seeds(self) -> list[int]:
        return sorted(int(r.summary["seed"]) for r in self.runs)

    def values(self, measure: str) -> np.ndarray:
        return np.array([float(r.summary[measure]) for r in self.runs])

    def mean(self, measure: str) -> float:
        return float(self.values(measure).mean())

    def std(self, measure: str) -> float:
        """Sample standard deviation over the seeds (0 for a single run)."""
        v = self.values(measure)
        return float(v.std(ddof=1)) if len(v) > 1 else 0.0


def find_runs(paths: Sequence[str | Path]) -> list[Path | ObjectPath]:
    """Run directories: each path (a directory or an fsspec URL) that holds summary.json (a run given itself, or
    one written straight into --out before every student got its own subdirectory), else every directory below
    it that does (the students of a --out, or folders of them)."""
    found: list[Path | ObjectPath] = []
    for p in map(location, paths):
        if not p.is_dir():
            raise TrainError(f"{p} is not a directory; pass run directories (distillery train --out) or folders "
                             f"holding them")
        found += [p] if (p / SUMMARY).is_file() else sorted(s.parent for s in p.rglob(SUMMARY))
    if not found:
        raise TrainError(f"no {SUMMARY} under {', '.join(map(str, paths))}; a run writes it when it finishes")
    unique = set(found)  # local directories first, in Path order as before, then URLs
    return sorted(p for p in unique if isinstance(p, Path)) + sorted(p for p in unique if isinstance(p, ObjectPath))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = "+".join(v) if isinstance(v, list) and k == "methods" else v
    return out


SUMMARY_LIMIT = CONFIG_LIMIT = 1 << 20  # the project writes a few KiB


def load_run(path: str | Path | ObjectPath) -> Run:
    """One run directory's summary and the setup that groups it, read as untrusted files (bounded, one line
    naming the file for anything wrong in it)."""
    path = location(path)
    hint = "it was not written by `distillery train`; remove it from the folders given to `distillery runs`"
    summary = read_json(path / SUMMARY, SUMMARY_LIMIT, TrainError, hint)
    if not isinstance(summary, dict):
        raise TrainError(f"{path / SUMMARY} is not a JSON object; {hint}")
    missing = [k for k in ("student", "methods", "seed", "params", *MEASURES) if k not in summary]
    if missing:
        raise TrainError(f"{path / SUMMARY} lacks {missing}; {hint}")
    bad = [k for k in ("seed", "params", *MEASURES)
           if isinstance(summary[k], bool) or not isinstance(summary[k], (int, float))]
    if bad or not isinstance(summary["student"], str) or not (
            isinstance(summary["methods"], list) and all(isinstance(m, str) for m in summary["methods"])):
        raise TrainError(f"{path / SUMMARY} has values of the wrong type ({', '.join(bad) or 'student/methods'}); "
                         f"{hint}")
    if (path / CONFIG).is_file():
        config = read_json(path / CONFIG, CONFIG_LIMIT, TrainError, hint)
        try:
            identity = TrainConfig(**config).identity() if isinstance(config, dict) else None
        except DistilleryError as e:  # its checks name options (--cache, ...) nobody gave to `distillery runs`
            raise TrainError(f"{path / CONFIG} is not a run's config ({e}); {hint}") from None
        if identity is None:
            raise TrainError(f"{path / CONFIG} is not a JSON object; {hint}")
        del identity["settings"]["seed"]
        setup = _flatten(identity)
    else:
        setup = _flatten({k: summary[k] for k in SUMMARY_SETUP if k in summary})
    return Run(path=path, summary=summary, setup=setup)


def group_runs(runs: Sequence[Run], by: str = "config") -> list[RunGroup]:
    """Runs with equal setups (and, `by` date or flow-run, the same day or folder), ordered by student,
    methods, the rest of the setup, then the day or folder: one setting's nights follow each other."""
    if by not in GROUPINGS:
        raise TrainError(f"--by must be one of {', '.join(GROUPINGS)}, not {by!r}")
    groups: dict[tuple[str, str, str, str], list[Run]] = {}
    for run in runs:
        key = (str(run.setup.get("student")), str(run.setup.get("methods")),
               json.dumps(run.setup, sort_keys=True, default=str), run.group(by))
        groups.setdefault(key, []).append(run)
    return [RunGroup(setup=groups[k][0].setup, runs=groups[k], group=k[3]) for k in sorted(groups)]


def varying_keys(groups: Sequence[RunGroup]) -> list[str]:
    """Setup keys (besides student and methods) whose value differs between groups: what a reader needs to
    tell the rows apart."""
    keys = sorted({k for g in groups for k in g.setup} - {"student", "methods"})
    return [k for k in keys if len({json.dumps(g.setup.get(k), default=str) for g in groups}) > 1]


class GroupRow(BaseModel):
    """One group of `group_rows`: who was trained, the settings that tell it from the other groups, its seeds,
    and the mean and std over them of each measure."""

    model_config = ConfigDict(frozen=True)

    student: str
    methods: str  # joined with "+"
    setup: dict[str, Any]  # the group's value of each `varying_keys` key (flat, dotted), in their order
    group: str = ""  # the day or flow run (folder) of `group_runs(by=...)`
    seeds: list[int]
    params: int
    mean: Measures
    std: Measures

    def labels(self) -> dict[str, str]:
        """Student, methods and the varying settings, as text: what names this row in a table or a legend."""
        group = {"group": self.group} if self.group else {}
        return {"student": self.student, "methods": self.methods, **{k: str(v) for k, v in self.setup.items()}, **group}


def group_rows(groups: Sequence[RunGroup]) -> list[GroupRow]:
    """One row per group: student, methods, the settings that vary, seeds, params, and the mean and std over
    seeds of each measure (`row.mean.train_seconds`, `row.std.train_seconds`)."""
    extra = varying_keys(groups)
    rows = []
    for g in groups:
        first = g.runs[0].summary
        rows.append(GroupRow(student=first["student"], methods="+".join(first["methods"]),
                             setup={k: g.setup.get(k) for k in extra}, group=g.group, seeds=g.seeds, params=int(first["params"]),
                             mean=Measures(**{m: g.mean(m) for m in MEASURES}),
                             std=Measures(**{m: g.std(m) for m in MEASURES})))
    return rows


def formatted_rows(rows: Sequence[GroupRow]) -> list[dict[str, str]]:
    """Rows for people: mean ± std over seeds (accuracy in %, times in s and ms, memory in MiB)."""
    def pm(row: GroupRow, m: str, scale: float, fmt: str, unit: str) -> str:
        mean, std = getattr(row.mean, m) * scale, getattr(row.std, m) * scale
        return f"{mean:{fmt}}{unit}" if len(row.seeds) == 1 else f"{mean:{fmt}} ± {std:{fmt}}{unit}"

    return [{**r.labels(), "seeds": ",".join(map(str, r.seeds)),
             "val accuracy": pm(r, "val_accuracy", 100, ".2f", " %"),
             "train time": pm(r, "train_seconds", 1, ".1f", " s"),
             "step": pm(r, "mean_step_seconds", 1000, ".1f", " ms"),
             "peak RSS": pm(r, "peak_rss_bytes", 2.0 ** -20, ".0f", " MiB"),
             "params": f"{r.params / 1e6:.2f} M"} for r in rows]


def compare_runs(paths: Sequence[str | Path], by: str = "config") -> list[RunGroup]:
    """Find, load and group (`group_runs`) the runs under `paths`."""
    return group_runs([load_run(p) for p in find_runs(paths)], by)


def group_label(row: GroupRow) -> str:
    """A row of `group_rows` named for a plot legend: student, methods, the varying settings, the seed count."""
    setup = " ".join(f"{k}={v}" if k not in ("student", "methods") else v for k, v in row.labels().items())
    return f"{setup} ({len(row.seeds)} seeds)"
