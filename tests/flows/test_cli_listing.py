"""The command line explains itself: every option has help, defaults come from the classes that declare them,
`distillery methods` and `distillery experiments` list what the code holds, choices are checked while parsing,
and one Prefect home whichever way the CLI starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from flows.cli import app
from pipeline.lab.experiments import EXPERIMENTS, SUITES
from pipeline.methods import list_methods
from pipeline.methods.base import _REGISTRY


@pytest.fixture
def wide(monkeypatch) -> None:
    """Tables and help one line per row, so a test can find a cell's whole text."""
    import flows.cli.display

    monkeypatch.setattr(flows.cli.display.console, "width", 1000)
    import typer.rich_utils

    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 1000)


def commands() -> dict[str, typer.core.TyperCommand]:
    return typer.main.get_command(app).commands


def test_every_option_and_argument_of_every_command_has_help() -> None:
    missing = [f"{name} {param.name}" for name, command in commands().items() for param in command.params
               if param.name != "help" and not (getattr(param, "help", None) or "").strip()]
    assert {"fit-teacher", "cache", "train", "methods", "experiments", "deploy"} <= commands().keys()
    assert missing == []


def test_option_defaults_are_the_ones_the_config_classes_declare() -> None:
    from pipeline.options import default_of
    from pipeline.teacher.plan import CacheRequest
    from pipeline.train.config import RunSettings
    from pipeline.train.fit import FitConfig
    from pipeline.train.optim import OptimConfig

    params = {name: {p.name: p for p in c.params} for name, c in commands().items()}
    for name in ("epochs", "seed", "batch_size", "lr", "weight_decay", "warmup_epochs", "workers", "device",
                 "optimizer", "on_bad_image"):
        declared_in = OptimConfig if name in OptimConfig.model_fields else RunSettings
        assert params["train"][name].default == default_of(declared_in, name), name
    for name in ("epochs", "batch_size", "lr", "objective", "temperature", "patch_size"):
        assert params["fit-teacher"][name].default == default_of(FitConfig, name), name
    for name in ("views", "view_seed", "logits", "tap", "grid", "shard_size", "shard_bytes", "batch_size",
                 "cka_source", "lsh_bits"):
        assert params["cache"][name].default == default_of(CacheRequest, name), name


def test_defaults_read_from_a_modules_source_are_the_ones_its_functions_declare() -> None:
    """`source_default` reads a default without importing its module (torch, faiss): the same value."""
    from flows.experiments import run_experiment
    from pipeline.cache.neighbors import lsh_neighbors
    from pipeline.cache.statistics import recompute_statistics
    from pipeline.lab.bench import run_benchmarks
    from pipeline.options import default_of
    from pipeline.teacher.verify import verify_cache

    params = {name: {p.name: p for p in c.params} for name, c in commands().items()}
    for command, function, names in (("stats", recompute_statistics, ("cka_source", "lsh_bits")),
                                     ("neighbors", lsh_neighbors, ("k",)),
                                     ("verify", verify_cache, ("samples", "seed", "rtol", "device")),
                                     ("bench", run_benchmarks, ("quick", "device")),
                                     ("experiment", run_experiment, ("root",))):
        for name in names:  # `--root` is a Path option of a str parameter: compared as text
            assert str(params[command][name].default) == str(default_of(function, name)), (command, name)


def test_a_default_that_is_no_constant_is_refused_when_read_from_source() -> None:
    from flows.cli.options import source_constant, source_default

    assert source_constant("pipeline.teacher.verify", "RTOL") == 2.0 ** -8
    with pytest.raises(TypeError, match="declares no default"):
        source_default("flows.experiments", "run_experiment", "seeds")  # no default: refused, not guessed
    with pytest.raises(TypeError, match="not a constant expression"):
        source_constant("pipeline.cache.targets", "STORABLE")  # computed at import: only importing knows it


def test_train_help_lists_every_method(wide) -> None:
    result = CliRunner().invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    assert f"NAME one of {', '.join(list_methods())}" in " ".join(result.output.split())


def test_methods_lists_each_method_its_needs_and_every_option_with_default_and_help(wide) -> None:
    result = CliRunner().invoke(app, ["methods"])
    assert result.exit_code == 0, result.output
    out = result.output
    for name in list_methods():
        cls = _REGISTRY[name]
        assert f"│ {name} " in out
        for option, default in cls.options().items():
            assert f"{option}={default}: {cls.option_help()[option]}" in out, (name, option)
    assert "teacher LSH codes (--lsh-bits B)" in out and "teacher feature maps (--featmaps" in out


def test_methods_of_one_name_and_of_an_unknown_one(cli, wide) -> None:
    code, out = cli("methods", "wkd_f")
    assert code == 0 and "wkd_f" in out and "│ kd " not in out and "(--tap STAGE --grid G (with --store, list gaussian))" in out
    code, out = cli("methods", "nope")
    assert code == 2 and out.startswith("error: unknown method 'nope'; known methods: ce, dkd")


def test_experiments_lists_every_experiment_its_rows_and_the_suites(wide) -> None:
    result = CliRunner().invoke(app, ["experiments"])
    assert result.exit_code == 0, result.output
    for experiment in EXPERIMENTS.values():
        assert experiment.name in result.output
        for label, methods in experiment.rows.items():
            assert f"{label}: {'+'.join(methods)}" in result.output, (experiment.name, label)
    assert all(suite in result.output for suite in SUITES)


def test_choice_options_refuse_other_values_in_one_line(cli, tmp_path: Path) -> None:
    code, out = cli("train", "--cache", str(tmp_path), "--student", "test_resnet", "--method", "ce", "--out",
                    str(tmp_path / "o"), "--optimizer", "lion")
    assert code == 2 and out.count("\n") == 1
    assert "Invalid value for '--optimizer': 'lion' is not one of 'adamw', 'sgd'" in out
    code, out = cli("fit-teacher", "--dataset", "digits", "--model", "test_resnet", "--out", str(tmp_path / "t.pt"),
                    "--objective", "byol")
    assert code == 2 and "'byol' is not one of 'supervised', 'ssl'" in out


def test_cache_without_teacher_or_checkpoint_is_refused_in_one_line(cli, tmp_path: Path) -> None:
    code, out = cli("cache", "--dataset", "digits", "--out", str(tmp_path / "c"))
    assert code == 2 and out == "error: give --teacher MODEL (a timm name), --checkpoint FILE whose model is " \
                                "then used, or --weights SOURCE\n"


def test_prefect_home_defaults_to_the_venv_whichever_way_the_cli_starts(monkeypatch, tmp_path: Path) -> None:
    from flows.server import default_prefect_home

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    default_prefect_home()
    assert os.environ["PREFECT_HOME"] == str(tmp_path)  # an explicit home is kept
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_HOME"}
    probe = ("import os, flows.cli\nfrom prefect.settings import get_current_settings\n"
             "print(os.environ['PREFECT_HOME']); print(get_current_settings().home)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = str(Path(sys.prefix) / "prefect-home")
    assert sys.prefix != sys.base_prefix  # the tests run in the project's venv, as `make test` does
    assert result.stdout.split() == [expected, expected]  # set before Prefect read it


def test_teacher_defaults_to_the_model_the_checkpoint_names(digits_teacher: Path) -> None:
    import torch

    from flows.cli.teacher import checkpoint_model

    assert checkpoint_model(digits_teacher) == torch.load(digits_teacher, weights_only=True)["model"] == "test_resnet"


def test_the_cli_starts_without_timm_scikit_learn_or_prefect() -> None:
    """`distillery --help` and the listings start in about 2 s of CPU instead of 4.5: timm (with torchvision and
    torch._dynamo), scikit-learn and Prefect are imported by the commands that use them, not by the CLI's import."""
    probe = ("import sys, flows.cli\n"
             "print(' '.join(m for m in ('timm', 'torchvision', 'sklearn', 'prefect') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []
