"""flows/cli/lazy.py and the torch-free configs: `distillery --help` and every `distillery COMMAND --help` without
importing torch, timm, faiss, zarr or Prefect."""

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from flows.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_commands_read_from_source_are_the_registered_commands() -> None:
    from flows.cli.lazy import GROUP_MODULES, loaded_commands, source_commands

    for group in GROUP_MODULES:
        assert {name: cmd.help for name, cmd in loaded_commands(group).items()} == source_commands(group)


def test_an_unknown_command_is_refused_and_a_known_one_runs() -> None:
    assert "No such command 'cahce'" in CliRunner().invoke(app, ["cahce"]).output
    result = CliRunner().invoke(app, ["methods", "kd"], terminal_width=200)
    assert result.exit_code == 0 and "kd" in result.output


def test_help_screens_and_command_modules_import_no_torch_timm_faiss_zarr_or_prefect() -> None:
    """`distillery --help` lists the commands from their source (`lazy`); a command's options read their
    defaults and help from torch-free config modules (and `source_default`), so its help screen is quick too.
    The library's heavy modules are imported when a command runs."""
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom flows.cli import app\n"
            "out = CliRunner().invoke(app, ['--help'], terminal_width=200).output\n"
            "assert 'fit-teacher' in out and 'deploy' in out, out\n"
            "assert 'flows.cli.teacher' not in sys.modules\n"
            "from flows.cli import deploy, lab, options, students, teacher\n"
            "for command, option in (('cache', '--views'), ('train', '--method'), ('fit-teacher', '--objective'),\n"
            "                        ('verify', '--rtol'), ('bench', '--quick'), ('experiment', '--root')):\n"
            "    out = CliRunner().invoke(app, [command, '--help'], terminal_width=200).output\n"
            "    assert option in out, out\n"
            "print(sorted(m for m in ('torch', 'timm', 'faiss', 'zarr', 'prefect') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
