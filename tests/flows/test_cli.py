"""The `distillery` command line: inspect output and one-line errors with exit code 2."""

from __future__ import annotations

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


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=120)


def test_errors_are_one_line_on_stderr_with_exit_code_2(tmp_path: Path) -> None:
    missing = run_cli("inspect", str(tmp_path))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "not a teacher cache" in missing.stderr
    bad_dataset = run_cli("fit-teacher", "--dataset", "cifar", "--model", "resnet18", "--out", str(tmp_path / "t.pt"))
    assert bad_dataset.returncode == 2 and "unknown dataset" in bad_dataset.stderr
    assert "Traceback" not in bad_dataset.stderr


def test_inspect_prints_feature_map_bytes_per_sample_view_and_the_teacher_tail(featmaps_cache: Path) -> None:
    from pipeline.cache.store import TeacherCache
    from pipeline.cache.summary import human_bytes

    stored = TeacherCache(featmaps_cache).array("featmaps/layer3")
    result = CliRunner().invoke(app, ["inspect", str(featmaps_cache)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "feature maps, bytes per sample-view" in result.output and "featmaps/layer3" in result.output
    assert human_bytes(stored[0, 0].nbytes) in result.output  # one map of one sample-view
    assert "teacher tail  teacher_tail.pt  resnet stages layer3" in result.output
