"""The `distillery` command line: inspect output and one-line errors with exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

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


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=120)


def test_errors_are_one_line_on_stderr_with_exit_code_2(tmp_path: Path) -> None:
    missing = run_cli("inspect", str(tmp_path))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "not a teacher cache" in missing.stderr
    bad_dataset = run_cli("fit-teacher", "--dataset", "cifar", "--model", "resnet18", "--out", str(tmp_path / "t.pt"))
    assert bad_dataset.returncode == 2 and "unknown dataset" in bad_dataset.stderr
    assert "Traceback" not in bad_dataset.stderr
