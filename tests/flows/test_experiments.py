"""`distillery experiment`: a scenario end to end on a real local Prefect server, and its reuse on rerun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.lab import experiments
from pipeline.lab.experiments import Experiment, ExperimentError, get_experiment, results_markdown

TINY = Experiment(name="tiny", description="tiny digits scenario", dataset="digits", teacher="test_resnet",
                  teacher_epochs=1, labelled=60, views=1, student="test_resnet", epochs=1,
                  rows={"ce": ("ce",), "ce+kd": ("ce", "kd:T=2")}, eval_every=1)



def student_run(root: Path, run: str) -> Path:
    """The student's run directory of TINY's `ROW-sSEED` under `root`: one level below the row's --out."""
    row, seed = run.rsplit("-s", 1)
    out = TINY.run_dir(root, row, int(seed))
    assert TINY.student_run(root, row, int(seed)).parent == out
    return TINY.student_run(root, row, int(seed))

@pytest.mark.slow
def test_experiment_fits_caches_trains_every_row_per_seed_then_reuses_everything(
        prefect_harness, tmp_path: Path, monkeypatch) -> None:
    from flows.experiments import run_experiment

    monkeypatch.setitem(experiments.EXPERIMENTS, "tiny", TINY)
    result = run_experiment("tiny", [0, 1], str(tmp_path))
    assert result.teacher.reused is False
    runs = {p.name for p in (tmp_path / "tiny" / "runs").iterdir()}
    assert runs == {"ce-s0", "ce-s1", "ce+kd-s0", "ce+kd-s1"}
    summaries = {r: json.loads((student_run(tmp_path, r) / "summary.json").read_text()) for r in runs}
    assert summaries["ce+kd-s1"]["methods"] == ["ce", "kd:T=2"] and summaries["ce+kd-s1"]["seed"] == 1
    accuracy = [100 * summaries[f"ce+kd-s{s}"]["val_accuracy"] for s in (0, 1)]
    assert f"| ce+kd | {sum(accuracy) / 2:.2f} ± " in results_markdown(result.rows)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["experiment-tiny"])))
    assert artifact.type == "markdown" and results_markdown(result.rows) in artifact.data

    # A rerun reuses the teacher, the cache and the finished runs; --row selects rows.
    again = run_experiment("tiny", [0, 1], str(tmp_path), ["ce+kd"])
    assert again.teacher.reused is True and again.cache.written_shards == 0
    assert [r.methods for r in again.rows] == ["ce+kd"] and again.rows[0] == result.rows[1]
    for r in runs:
        rerun = json.loads((student_run(tmp_path, r) / "summary.json").read_text())
        assert rerun["train_seconds"] == summaries[r]["train_seconds"]


@pytest.mark.slow
def test_experiment_without_a_server_runs_here_without_prefect_and_a_rerun_reuses_everything(tmp_path: Path) -> None:
    """No PREFECT_API_URL: `distillery experiment` runs the library in its own process (`run_here`), no flow and
    no temporary server, as `cache` and `train` do; the same steps, so a rerun reuses teacher, cache and runs."""
    from pipeline.lab.experiments import run_here

    code = ("import sys\nfrom pipeline.lab import experiments\nfrom tests.flows.test_experiments import TINY\n"
            "experiments.EXPERIMENTS['tiny'] = TINY\nfrom flows.cli import main\n"
            f"sys.argv = ['distillery', 'experiment', 'tiny', '--seed', '0', '--row', 'ce+kd', '--root', "
            f"{str(tmp_path)!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('flows.experiments', 'prefect.server.api.server') if m in sys.modules))")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env={**env, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.rstrip().endswith("[]"), done.stdout  # neither the flow nor Prefect's server was imported
    assert "tiny digits scenario (val accuracy %)" in done.stdout and "ce+kd" in done.stdout
    runs = tmp_path / "tiny" / "runs"
    assert {p.name for p in runs.iterdir()} == {"ce+kd-s0"}
    trained = json.loads((student_run(tmp_path, "ce+kd-s0") / "summary.json").read_text())
    assert trained["methods"] == ["ce", "kd:T=2"] and (tmp_path / "tiny" / "cache" / "report.html").is_file()

    again = run_here(TINY.select(["ce+kd"]), [0], tmp_path)
    assert again.teacher.reused is True and again.cache.written_shards == 0
    assert json.loads((student_run(tmp_path, "ce+kd-s0") / "summary.json").read_text())["train_seconds"] == \
        trained["train_seconds"]


def test_unknown_experiment_is_one_line(cli) -> None:
    with pytest.raises(ExperimentError, match="unknown experiment 'nope'; known: .*fmnist-5k"):
        get_experiment("nope")
    code, out = cli("experiment", "nope")
    assert code == 2 and out.strip().startswith("error: unknown experiment 'nope'")
    code, out = cli("experiment", "fmnist-5k", "--row", "ce+magic")
    assert code == 2 and "experiment 'fmnist-5k' has no row 'ce+magic'; rows: ce, ce+kd" in out
