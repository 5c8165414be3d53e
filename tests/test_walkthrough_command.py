"""docs/ARCHITECTURE.md "Where new things go", walked through: a command, `distillery best RUNDIR...`.

Steps 1 and 2 of the section, done at test time instead of in the package: a command registered on the
students group (`flows.cli.students.group`), whose options have help and library defaults, and whose body
parses, makes one library call and prints with `flows.cli.display`. Then, unchanged, `distillery` lists it,
runs it, and turns its bad input into one line with exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from flows.cli import app, students
from flows.cli.display import print_table
from pipeline.options import default_of
from pipeline.train.runs import compare_runs, formatted_rows, group_rows


@pytest.fixture
def best_command(monkeypatch) -> None:
    """Steps 1 and 2: `best` registered on the students group for this test only."""
    monkeypatch.setattr(students.group, "registered_commands", list(students.group.registered_commands))

    @students.group.command("best")
    def best_cmd(
        rundirs: Annotated[list[str], typer.Argument(help="run directories, or folders holding them")],
        by: Annotated[students.Grouping, typer.Option(help="config | date | flow-run, as `distillery runs --by`")]
        = default_of(compare_runs, "by"),
    ) -> None:
        """The setting of the runs with the best mean validation accuracy."""
        rows = group_rows(compare_runs(rundirs, by))  # the library call
        best = max(rows, key=lambda r: r.mean.val_accuracy)
        print_table(f"best of {len(rows)} settings", formatted_rows([best]))


def write_run(path: Path, methods: list[str], accuracy: float) -> None:
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({
        "student": "test_resnet", "methods": methods, "seed": 0, "val_accuracy": accuracy, "train_seconds": 3.0,
        "mean_step_seconds": 0.01, "peak_rss_bytes": 2 ** 30, "params": 123_456}))


def test_a_command_registered_on_a_group_is_listed_run_and_its_errors_are_one_line(best_command, cli,
                                                                                   tmp_path: Path) -> None:
    write_run(tmp_path / "ce", ["ce"], 0.80)
    write_run(tmp_path / "kd", ["ce", "kd"], 0.85)
    listing = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert "The setting of the runs with the best mean validation accuracy" in listing.output
    best = typer.main.get_command(app).commands["best"]
    assert all((getattr(p, "help", None) or "").strip() for p in best.params)  # tests/flows/test_cli_listing.py's rule
    result = CliRunner().invoke(app, ["best", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "best of 2 settings" in result.output and "ce+kd" in result.output and "85.00 %" in result.output
    code, out = cli("best", str(tmp_path / "nowhere"))  # a library error: one line, exit 2
    assert code == 2 and out == f"error: {tmp_path / 'nowhere'} is not a directory; pass run directories " \
                                f"(distillery train --out) or folders holding them\n"
    code, out = cli("best", str(tmp_path), "--by", "week")  # a choice the option refuses while parsing
    assert code == 2 and out.count("\n") == 1 and "'week' is not one of 'config', 'date', 'flow-run'" in out


def test_the_command_is_gone_after_the_test() -> None:
    assert "best" not in typer.main.get_command(app).commands
