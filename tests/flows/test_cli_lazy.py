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
