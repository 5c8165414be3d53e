"""The `distillery` command line: inspect output and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.text import Text
from typer.testing import CliRunner

from flows.cli import app


def test_inspect_prints_manifest_arrays_and_statistics(digits_cache: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", str(digits_cache)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "status=complete" in out and "test_resnet" in out and "N=1437" in out
    for name in ("logits/dense", "features/pooled", "gaussian/std", "stats/pca/components", "stats/cka/ir"):
        assert name in out
    assert "teacher per view" in out and "components_for_90pct" in out


def test_inspect_writes_the_html_report(digits_cache: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", str(digits_cache), "--report", str(tmp_path / "out" / "r.html")])
    assert result.exit_code == 0, result.output
    assert "report written to" in result.output and "lsh: no LSH codes" in result.output
    page = (tmp_path / "out" / "r.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("data:image/png;base64,") == 6


def test_verify_exits_0_on_a_good_cache_and_1_on_a_corrupt_shard(digits_cache: Path, tmp_path: Path) -> None:
    good = CliRunner().invoke(app, ["verify", str(digits_cache), "--samples", "8"])
    assert good.exit_code == 0, good.output
    assert "OK: 4 shard checksums, 4 arrays checked" in good.output and "logits/dense" in good.output
    corrupt = tmp_path / "corrupt"
    shutil.copytree(digits_cache, corrupt)
    shard = sorted((corrupt / "shards").glob("*.tar"))[2]
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    bad = CliRunner().invoke(app, ["verify", str(corrupt), "--samples", "8"])
    assert bad.exit_code == 1, bad.output
    assert "MISMATCH" in bad.output and "shard 2" in bad.output


def test_runs_prints_a_markdown_table_and_a_plot(tmp_path: Path) -> None:
    for seed, accuracy in enumerate((0.5, 0.7)):
        run = tmp_path / "sweep" / f"s{seed}"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({
            "student": "test_resnet", "methods": ["ce", "kd"], "seed": seed, "val_accuracy": accuracy,
            "train_seconds": 3.0, "mean_step_seconds": 0.01, "peak_rss_bytes": 2 ** 30, "params": 123_456}))
    result = CliRunner().invoke(app, ["runs", str(tmp_path / "sweep"), "--markdown", "--plot",
                                      str(tmp_path / "plot.png")])
    assert result.exit_code == 0, result.output
    assert "plot written to" in result.stderr  # stdout holds the table alone
    assert result.stdout.splitlines() == [
        "| student | methods | seeds | val accuracy | train time | step | peak RSS | params |",
        "|---|---|---|---|---|---|---|---|",
        "| test_resnet | ce+kd | 0,1 | 60.00 ± 14.14 % | 3.0 ± 0.0 s | 10.0 ± 0.0 ms | 1024 ± 0 MiB | 0.12 M |"]
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")


def test_runs_by_date_and_by_flow_run(tmp_path: Path, cli) -> None:
    """Three nights of one setting: one row by config, one a night by date (in date order), one a folder by
    flow-run; a grouping the library does not know is refused while parsing."""
    for night, accuracy in enumerate((0.61, 0.62, 0.55)):
        run = tmp_path / f"nightly-{night}" / "test_resnet-ce-s0"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({
            "student": "test_resnet", "methods": ["ce"], "seed": 0, "val_accuracy": accuracy, "train_seconds": 3.0,
            "mean_step_seconds": 0.01, "peak_rss_bytes": 2 ** 30, "params": 123_456,
            "finished_at": f"2026-12-0{night + 1}T02:00:00+00:00"}))

    def rows(*args: str) -> list[str]:
        code, out = cli("runs", str(tmp_path), "--markdown", *args)
        assert code == 0, out
        return [line for line in out.splitlines() if line.startswith("| test_resnet")]

    (one,) = rows()
    assert "| 0,0,0 | 59.33 ± 3.79 % |" in one
    assert [r.split(" | ")[2:4] for r in rows("--by", "date")] == [
        ["2026-12-01", "0"], ["2026-12-02", "0"], ["2026-12-03", "0"]]
    assert [r.split(" | ")[2] for r in rows("--by", "flow-run")] == ["nightly-0", "nightly-1", "nightly-2"]
    assert "61.00 %" in rows("--by", "date")[0] and "55.00 %" in rows("--by", "date")[2]
    code, out = cli("runs", str(tmp_path), "--by", "week")
    assert code == 2 and out.count("\n") == 1
    assert "Invalid value for '--by': 'week' is not one of 'config', 'date', 'flow-run'" in out


def test_version_is_the_installed_packages(cli) -> None:
    from importlib.metadata import version

    assert cli("--version") == (0, f"{version('distillery')}\n")
    result = CliRunner().invoke(app, ["--version", "inspect", "nowhere"])  # eager: before any command runs
    assert result.exit_code == 0 and result.output == f"{version('distillery')}\n"


def test_distillery_alone_prints_its_help_once_and_exits_2() -> None:
    alone = run_cli()
    assert alone.returncode == 2 and alone.stdout.count("Usage:") == 1 and "--version" in alone.stdout


def run_cli(*args: str, server: bool = False) -> subprocess.CompletedProcess:
    """`distillery ARGS` in a subprocess; `server`: talking to the session's test server (a flow command
    otherwise boots its own temporary one)."""
    env = None
    if server:
        from prefect.settings import get_current_settings

        env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url)}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_errors_are_one_line_on_stderr_with_exit_code_2(tmp_path: Path) -> None:
    missing = run_cli("inspect", str(tmp_path))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "not a teacher cache" in missing.stderr
    bad_dataset = run_cli("fit-teacher", "--dataset", "cifar", "--model", "resnet18", "--out", str(tmp_path / "t.pt"))
    assert bad_dataset.returncode == 2 and "unknown dataset" in bad_dataset.stderr
    assert "Traceback" not in bad_dataset.stderr


def test_without_a_terminal_each_finished_loop_is_one_line_with_its_rate(prefect_harness, tmp_path: Path) -> None:
    fitted = run_cli("fit-teacher", "--dataset", "digits", "--model", "test_resnet", "--epochs", "1", "--subset", "200",
                     "--out", str(tmp_path / "t.pt"), server=True)
    assert fitted.returncode == 0, fitted.stderr
    progress, result = fitted.stdout.strip().splitlines()[-2:]
    assert re.fullmatch(r"fit test_resnet: 200 samples in [0-9.]+ s, [0-9,]+ samples/s", progress), progress
    assert re.match(r"teacher test_resnet: val accuracy \d+\.\d\d% after 1 epochs", result), result


def test_fit_teacher_does_not_overwrite_a_checkpoint_unless_told(tmp_path: Path) -> None:
    from pipeline.train.fit import FitConfig, check_fit

    out = tmp_path / "t.pt"
    out.write_bytes(b"the teacher some caches were made from")
    refused = run_cli("fit-teacher", "--dataset", "digits", "--model", "test_resnet", "--out", str(out))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"--out {out} exists; pass --overwrite to replace it" in refused.stderr
    assert out.read_bytes() == b"the teacher some caches were made from"
    check_fit(FitConfig(dataset="digits", model="test_resnet", out=str(out), overwrite=True))  # --overwrite passes


def test_loop_descriptions_are_plain_text_not_rich_markup(monkeypatch) -> None:
    import io

    from rich.console import Console
    from rich.progress import Progress

    import flows.cli.display as display
    from pipeline.progress import progress_task

    terminal = Console(file=io.StringIO(), force_terminal=True, width=200)  # a bar's description, escaped
    reporter = display.RichReporter(Progress(console=terminal, auto_refresh=False))
    reporter.start("t", "test_resnet [ce+kd]", 10, "samples")
    assert Text.from_markup(reporter.display.tasks[0].description).plain == "test_resnet [ce+kd]"
    log = io.StringIO()  # no terminal: plain lines
    monkeypatch.setattr(display, "console", Console(file=log, width=200))
    with display.show_progress(), progress_task("test_resnet [ce+kd]", 10) as task:
        task.advance(10)
    assert log.getvalue().startswith("test_resnet [ce+kd]: 10 samples in ")


def test_without_a_terminal_long_loops_report_plain_periodic_lines(monkeypatch) -> None:
    """`pipeline.progress.LineReporter` reports when stdout is a log: a line per loop every 10 s, then its end."""
    import io

    from rich.console import Console

    import flows.cli.display as display
    from pipeline import progress

    log = io.StringIO()
    monkeypatch.setattr(display, "console", Console(file=log, width=200))
    with display.show_progress():
        reporter = progress._reporter
        assert isinstance(reporter, progress.LineReporter) and reporter.interval == 10
        now = [0.0]
        reporter.clock = lambda: now[0]
        with progress.progress_task("teacher pass", 5000) as task:
            now[0] = 11.0
            task.advance(1200)
            now[0] = 12.0
            task.advance(100)  # within 10 s of the last line: no line
    assert progress._reporter is None
    assert log.getvalue().splitlines() == ["teacher pass: 1,200/5,000 samples (24 %), 109 samples/s, ETA 35 s",
                                           "teacher pass: 1,300 samples in 12.0 s, 108 samples/s"]


def _copy(cache: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(cache, tmp_path / "cache"))


def test_stats_recomputes_interrelations_from_features_without_the_teacher(digits_cache: Path, tmp_path: Path,
                                                                            monkeypatch) -> None:
    import json

    import numpy as np

    import pipeline.teacher.model as model
    from pipeline.cache.reader import TeacherCache
    from pipeline.stats.cka import linear_cka, pair_sample_counts

    copy = _copy(digits_cache, tmp_path)
    monkeypatch.setattr(model, "create_timm_model", lambda *a, **k: pytest.fail("teacher constructed"))
    result = CliRunner().invoke(app, ["stats", str(copy), "--cka-source", "features"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["cka_source"] == "features"

    cache = TeacherCache(copy)
    assert cache.manifest.status == "complete" and cache.manifest.stats.cka_source == "features"
    feats = cache.read("features/pooled")[:, 0].astype(np.float64)
    labels = cache.read("samples/labels")
    m = pair_sample_counts(np.bincount(labels, minlength=cache.num_classes))
    blocks = [feats[labels == c] for c in range(cache.num_classes)]
    direct = np.array([[linear_cka(a[:m[i, j]], b[:m[i, j]]) for j, b in enumerate(blocks)]
                       for i, a in enumerate(blocks)])
    np.testing.assert_allclose(cache.read("stats/cka/ir"), direct, atol=1e-4)
    assert not np.allclose(cache.read("stats/cka/ir"), TeacherCache(digits_cache).read("stats/cka/ir"), atol=1e-3)


def test_stats_with_an_unknown_cka_source_leaves_the_cache_complete(digits_cache: Path, tmp_path: Path) -> None:
    from pipeline.cache.manifest import Manifest

    copy = _copy(digits_cache, tmp_path)
    bad = run_cli("stats", str(copy), "--cka-source", "pixels")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "Invalid value for '--cka-source': 'pixels' is not one of 'auto', 'logits', 'features'" in bad.stderr
    assert Manifest.load(copy).status == "complete"


def test_cache_command_computes_interrelations_from_features(prefect_harness, digits_teacher: Path,
                                                             tmp_path: Path) -> None:
    import numpy as np

    from pipeline.cache.reader import TeacherCache
    from pipeline.stats.cka import category_interrelations

    out = tmp_path / "features-ir"
    result = CliRunner().invoke(app, [
        "cache", "--dataset", "digits", "--checkpoint", str(digits_teacher),  # --teacher: the checkpoint's model
        "--out", str(out), "--views", "0", "--subset", "300", "--shard-size", "150", "--device", "cpu",
        "--cka-source", "features"])
    assert result.exit_code == 0, result.output
    cache = TeacherCache(out)
    assert cache.manifest.teacher.model == "test_resnet"
    assert cache.manifest.stats.cka_source == "features"
    labels = cache.read("samples/labels")
    expected = category_interrelations(cache.read("features/pooled")[:, 0], labels, cache.num_classes).ir
    np.testing.assert_allclose(cache.read("stats/cka/ir"), expected, atol=1e-6)

def test_stats_lsh_bits_then_neighbors_table(digits_cache: Path, tmp_path: Path) -> None:
    import re
    import shutil

    from pipeline.cache.neighbors import lsh_neighbors
    from pipeline.cache.reader import TeacherCache

    copy = tmp_path / "cache"
    shutil.copytree(digits_cache, copy)
    stats = CliRunner().invoke(app, ["stats", str(copy), "--lsh-bits", "32"])
    assert stats.exit_code == 0, stats.output
    assert '"bits": 32' in stats.output and "lsh/codes" in stats.output
    result = CliRunner().invoke(app, ["neighbors", str(copy), "5", "--k", "3"])
    assert result.exit_code == 0, result.output
    assert "3 nearest neighbours of sample 5" in result.output and "over 32 LSH bits" in result.output
    found = lsh_neighbors(TeacherCache(copy), 5, k=3)
    for i, n in enumerate(found.neighbors):
        assert re.search(rf"│\s*{i + 1}\s*│\s*{n.id}\s*│\s*{n.class_name}\s*│\s*{n.hamming}\s*│", result.output)
    assert "lsh_bits=32" in CliRunner().invoke(app, ["inspect", str(copy)]).output

def test_inspect_prints_feature_map_bytes_per_sample_view_and_the_teacher_tail(featmaps_cache: Path) -> None:
    from pipeline.cache.reader import TeacherCache
    from pipeline.cache.summary import human_bytes

    stored = TeacherCache(featmaps_cache).array("featmaps/layer3")
    result = CliRunner().invoke(app, ["inspect", str(featmaps_cache)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "feature maps, bytes per sample-view" in result.output and "featmaps/layer3" in result.output
    assert human_bytes(stored[0, 0].nbytes) in result.output  # one map of one sample-view
    assert "teacher tail  teacher_tail.pt  resnet stages layer3" in result.output
