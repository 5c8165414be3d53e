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


def test_stats_lsh_bits_then_neighbors_table(digits_cache: Path, tmp_path: Path) -> None:
    import re
    import shutil

    from pipeline.cache.neighbors import lsh_neighbors
    from pipeline.cache.store import TeacherCache

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
