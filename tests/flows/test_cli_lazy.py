"""flows/cli/lazy.py: `distillery --help` lists every command without importing torch, timm or Prefect."""

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from flows.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_help_imports_no_heavy_module() -> None:
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom flows.cli import app\n"
            "out = CliRunner().invoke(app, ['--help'], terminal_width=200).output\n"
            "assert 'fit-teacher' in out and 'deploy' in out, out\n"
            "print(sorted(m for m in ('torch', 'timm', 'prefect') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_commands_read_from_source_are_the_registered_commands() -> None:
    from flows.cli.lazy import GROUP_MODULES, loaded_commands, source_commands

    for group in GROUP_MODULES:
        assert {name: cmd.help for name, cmd in loaded_commands(group).items()} == source_commands(group)


def test_an_unknown_command_is_refused_and_a_known_one_runs() -> None:
    assert "No such command 'cahce'" in CliRunner().invoke(app, ["cahce"]).output
    result = CliRunner().invoke(app, ["methods", "kd"], terminal_width=200)
    assert result.exit_code == 0 and "kd" in result.output


def test_a_command_help_is_rendered_once_then_printed_without_torch(tmp_path: Path) -> None:
    """flows/cli/help_cache.py: the first `cache --help` renders (and imports torch), the second prints the kept
    screen: the same text, and `-X importtime` shows no torch, timm, faiss or Prefect."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path), "COLUMNS": "120"}
    first = subprocess.run([sys.executable, "-m", "flows.cli", "cache", "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=env)
    assert first.returncode == 0 and "--views" in first.stdout, first.stderr
    again = subprocess.run([sys.executable, "-X", "importtime", "-m", "flows.cli", "cache", "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0 and again.stdout == first.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in again.stderr.splitlines() if "|" in line}
    assert "flows" in imported and not imported & {"torch", "timm", "faiss", "prefect", "zarr"}


def test_a_kept_help_screen_is_printed_only_for_the_terminal_and_code_it_was_rendered_for(
        tmp_path: Path, monkeypatch, capsys) -> None:
    from flows.cli import help_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "120")
    assert not help_cache.print_kept("train")  # nothing kept yet
    help_cache.keep("train", "the train screen\n")
    assert help_cache.print_kept("train") and capsys.readouterr().out == "the train screen\n"
    monkeypatch.setenv("COLUMNS", "80")  # another width: rendered anew
    assert not help_cache.print_kept("train")
    assert help_cache.help_request(["train", "--help"]) == "train"
    assert help_cache.help_request(["train", "--epochs", "2", "--help"]) is None  # only the bare request
