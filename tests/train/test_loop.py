"""`train_student`: the run directory of docs/ARCHITECTURE.md#command-line-contract, exact resume, and one-line refusals of bad input."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest
import timm
import torch

from pipeline.cache.manifest import CacheError
from pipeline.cache.reader import TeacherCache
from pipeline.data.datasets import samples_fingerprint
from pipeline.methods import Method, MethodError, StudentInfo, register_method
from pipeline.methods.base import _REGISTRY
from pipeline.train.config import RunSettings, StudentSpec, TrainConfig, TrainError
from pipeline.train.loop import check_run, train_student
from pipeline.train.rundir import RunDir
from pipeline.train.student import Student
from pipeline.train.summary import TrainSummary

STUDENT = "test_resnet"
SUMMARY_KEYS = {"student", "methods", "seed", "epochs", "val_accuracy", "train_seconds", "mean_step_seconds",
                "peak_rss_bytes", "cache", "online_teacher", "params", "val_skipped_images", "environment",
                "world_size"}


def config(cache: Path, out: Path, methods=("ce", "kd"), **settings) -> TrainConfig:
    settings = {"epochs": 1, "batch_size": 32, "workers": 0, **settings}
    return TrainConfig(cache=str(cache), student=STUDENT, methods=tuple(methods), out=str(out),
                       settings=RunSettings(**settings))


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_holds_config_metrics_summary_and_plain_student_weights(make_cache, tmp_path: Path) -> None:
    cache = make_cache(n=100)
    cfg = config(cache, tmp_path / "run", methods=("ce", "kd:T=2", "fitnet:weight=0.5", "dkd:warmup=0"))
    summary = train_student(cfg)

    run = tmp_path / "run"
    assert TrainConfig(**json.loads((run / "config.json").read_text())) == cfg
    written = json.loads((run / "summary.json").read_text())
    # summary.json keeps its keys, in the order they have always been written (other tools read the file).
    assert SUMMARY_KEYS <= set(written) and written == summary.to_dict() and list(written) == list(TrainSummary.model_fields)
    assert 0 <= summary.val_accuracy <= 1 and summary.online_teacher is False and summary.world_size == 1
    assert datetime.fromisoformat(summary.finished_at).tzinfo is not None  # what `runs --by date` groups by
    assert summary.methods == ["ce", "kd:T=2", "fitnet:weight=0.5", "dkd:warmup=0"]
    assert summary.mean_step_seconds > 0 and summary.peak_rss_bytes > 0 and summary.steps == 4
    assert summary.mean_step_seconds < summary.first_step_seconds  # setup and the loader's start come first

    lines = _lines(run)
    steps, epochs = [r for r in lines if r["kind"] == "step"], [r for r in lines if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == [0, 1, 2, 3] and len(epochs) == 1
    for r in steps:
        terms = r["ce"] + r["kd"] + r["fitnet"] + r["dkd_tckd"] + r["dkd_nckd"]
        assert r["loss"] == pytest.approx(terms, rel=1e-5) and r["epoch"] == 0
    assert epochs[0]["val_accuracy"] == summary.val_accuracy

    # student.pt is a plain timm state dict: the FitNet map is training-only.
    state = torch.load(run / "student.pt", weights_only=True)
    timm.create_model(STUDENT, num_classes=10, in_chans=1).load_state_dict(state, strict=True)


def test_a_resumed_run_ends_exactly_like_an_uninterrupted_one(make_cache, tmp_path: Path, interrupted) -> None:
    cache = make_cache(n=96)
    whole = train_student(config(cache, tmp_path / "whole", epochs=2))
    with interrupted():
        train_student(config(cache, tmp_path / "killed", epochs=2))
    resumed = train_student(config(cache, tmp_path / "killed", epochs=2, resume=True, device="cpu"))

    assert resumed.val_accuracy == whole.val_accuracy and resumed.steps == whole.steps
    drop = ("step_seconds",)
    strip = lambda run: [{k: v for k, v in r.items() if k not in drop} for r in _lines(run)]  # noqa: E731
    assert strip(tmp_path / "killed") == strip(tmp_path / "whole")
    a, b = (torch.load(tmp_path / run / "student.pt", weights_only=True) for run in ("whole", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_config_and_a_fresh_run_never_overwrites(make_cache, tmp_path: Path) -> None:
    cache = make_cache(n=64)
    train_student(config(cache, tmp_path / "run"))
    with pytest.raises(TrainError, match="already holds a run; pass --resume"):
        check_run(config(cache, tmp_path / "run"))
    with pytest.raises(TrainError, match=r"different settings\.seed \(checkpoint: 0, requested: 1\)"):
        check_run(config(cache, tmp_path / "run", seed=1, resume=True))
    with pytest.raises(TrainError, match="different methods"):
        check_run(config(cache, tmp_path / "run", methods=("ce",), resume=True))
    # The same config resumes a finished run: nothing left to train, the same summary again.
    again = train_student(config(cache, tmp_path / "run", resume=True))
    assert again.steps == 2 and len(_lines(tmp_path / "run")) == 3


def test_refuses_a_partial_cache_and_one_that_fails_its_checksums(make_cache, tmp_path: Path) -> None:
    cache = make_cache(n=64)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(cache, corrupt)
    shard = corrupt / "shards" / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    with pytest.raises(CacheError, match="shard 0: .* fails its sha256"):
        check_run(config(corrupt, tmp_path / "a"))

    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "status": "partial"}))
    with pytest.raises(CacheError, match="partial cache"):
        check_run(config(cache, tmp_path / "b"))


def _edit_manifest(root: Path, section: str, **changes) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    manifest[section].update(changes)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_refuses_class_mismatch_zero_views_and_methods_the_cache_cannot_serve(make_cache, tmp_path: Path) -> None:
    mismatch = make_cache("mismatch", n=64)
    # Other class names with the dataset fingerprint recomputed, as a forger would: the cache opens, and its
    # classes are not the val split's.
    stored = TeacherCache(mismatch)
    names = [f"class {i}" for i in range(10)]
    _edit_manifest(mismatch, "dataset", class_names=names, fingerprint=samples_fingerprint(
        stored.read("samples/ids"), stored.read("samples/labels"), names))
    with pytest.raises(TrainError, match="class mismatch: the cache .* has 10 classes, the digits val split has 10"):
        check_run(config(mismatch, tmp_path / "a"))
    fewer = make_cache("fewer", n=64)  # fewer classes than its labels name: refused when the cache opens
    _edit_manifest(fewer, "dataset", num_classes=5, class_names=list("01234"))
    with pytest.raises(CacheError, match="outside the manifest's 5 classes"):
        check_run(config(fewer, tmp_path / "a2"))

    no_views = make_cache("no-views", n=64)
    _edit_manifest(no_views, "views", num_augmented=-1)
    with pytest.raises(CacheError, match=r"views\.num_augmented must lie in \[0, 64\], not -1"):
        check_run(config(no_views, tmp_path / "b"))

    headless = make_cache("headless", n=64, logits="none")
    with pytest.raises(MethodError, match="'kd' needs teacher logits.*--logits dense"):
        check_run(config(headless, tmp_path / "c"))
    with pytest.raises(MethodError, match="'kd' is given twice"):
        check_run(config(make_cache("twice", n=64), tmp_path / "d", methods=("ce", "kd", "kd:T=2")))
    with pytest.raises(TrainError, match="has no checkpoint"):
        check_run(config(make_cache("random-teacher", n=64), tmp_path / "e", online_teacher=True))


def test_methods_get_the_student_stages_they_tap_with_their_shapes() -> None:
    @register_method
    class ReadsTwoStages(Method):
        name = "test_reads_two_stages"
        student_taps = (-1, -2)

        def forward(self, student, targets, labels, progress):
            return {}

    try:
        taps = StudentSpec(student="test_resnet", methods=("ce", "test_reads_two_stages")).taps
        assert taps == (-2, -1)
        student = Student("test_resnet", 10, 1, 16, taps=taps)
        info = student.info()
        assert isinstance(info, StudentInfo) and set(info.taps) == {-1, -2}
        out = student(torch.zeros(2, 1, 16, 16))
        for name, shape in info.feature_shapes.items():
            assert tuple(out.feature_maps[name].shape[1:]) == shape
        assert info.taps[-1] != info.taps[-2]
    finally:
        del _REGISTRY["test_reads_two_stages"]


def test_eval_every_evaluates_on_schedule_and_after_the_last_epoch(make_cache, tmp_path: Path) -> None:
    cfg = config(make_cache(n=40), tmp_path / "run", epochs=3, eval_every=2)
    summary = train_student(cfg)
    evaluated = [r["epoch"] for r in _lines(tmp_path / "run") if r["kind"] == "epoch" and "val_accuracy" in r]
    assert evaluated == [1, 2] and summary.val_accuracy is not None


def test_a_run_directory_in_use_is_refused_naming_its_holder_and_released_when_the_holder_is_killed(
        make_cache, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    cache, out = make_cache(n=64), tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipeline.train.rundir import RunDir\n"
                               "with RunDir(sys.argv[1]).locked():\n    print('held', flush=True); time.sleep(60)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        for resume in (False, True):
            with pytest.raises(TrainError, match=rf"{out} is in use by another run \(pid {holder.pid} on .+ since "
                                                 rf".+\); wait for it to end or choose another --out"):
                train_student(config(cache, out, resume=resume))
        assert sorted(p.name for p in out.iterdir()) == ["run.lock", "run.lock.json"]  # nothing of a run
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the kernel drops a killed holder's flock at once; allow for scheduling
        try:
            RunDir(out).check_unlocked()
            break
        except TrainError:
            time.sleep(0.05)
    assert train_student(config(cache, out)).steps == 2


def test_a_torn_last_metrics_line_is_dropped_and_the_run_resumes_exactly(make_cache, tmp_path: Path,
                                                                         monkeypatch) -> None:
    cache = make_cache(n=96)
    whole = train_student(config(cache, tmp_path / "whole", epochs=2))

    log = RunDir.log

    def killed_while_logging_the_second_epoch(self: RunDir, records: list[dict]) -> None:
        if records[0]["epoch"] == 0:
            return log(self, records)
        with open(self.path / "metrics.jsonl", "a") as f:  # half of the first record, as a kill leaves it
            f.write(json.dumps(records[0])[:25])
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "log", killed_while_logging_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_student(config(cache, tmp_path / "killed", epochs=2))
    monkeypatch.undo()
    assert not (tmp_path / "killed" / "metrics.jsonl").read_text().endswith("\n")
    resumed = train_student(config(cache, tmp_path / "killed", epochs=2, resume=True))

    assert resumed.val_accuracy == whole.val_accuracy and resumed.steps == whole.steps
    strip = lambda run: [{k: v for k, v in r.items() if k != "step_seconds"} for r in _lines(run)]  # noqa: E731
    assert strip(tmp_path / "killed") == strip(tmp_path / "whole")
    a, b = (torch.load(tmp_path / run / "student.pt", weights_only=True) for run in ("whole", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_bad_metrics_line_before_the_last_is_refused_naming_it(make_cache, tmp_path: Path) -> None:
    cache, out = make_cache(n=64), tmp_path / "run"
    train_student(config(cache, out, epochs=1))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    with pytest.raises(TrainError, match=rf"{out / 'metrics.jsonl'} line 2 is not a metrics record"):
        train_student(config(cache, out, epochs=1, resume=True))
