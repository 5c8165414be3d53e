"""Every bad input to a flow command is one line on stderr and exit code 2, no Prefect traceback: checked
before the flow starts where it can be, and a `DistilleryError` raised inside a flow run arrives the same."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: --device cuda is valid here")
CACHE = ["cache", "--dataset", "digits", "--teacher", "test_resnet", "--subset", "60", "--device", "cpu"]
TRAIN = ["train", "--student", "test_resnet", "--method", "ce", "--epochs", "1", "--workers", "0"]


def distillery(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=180,
                          env=env)


@pytest.mark.parametrize("args, message", [
    (CACHE + ["--checkpoint", "{tmp}/missing.pt"], "checkpoint {tmp}/missing.pt does not exist"),
    (["cache", "--dataset", "cifar", "--teacher", "test_resnet"], "unknown dataset 'cifar'"),
    # a typo gets the closest names (pipeline.errors.did_you_mean)
    (["cache", "--dataset", "digit", "--teacher", "test_resnet"], "unknown dataset 'digit' (did you mean 'digits'?)"),
    (CACHE[:4] + ["resnet1"] + CACHE[5:], "unknown timm model 'resnet1' (did you mean 'resnet18'"),
    (TRAIN[:4] + ["kdd"] + TRAIN[5:] + ["--cache", "{cache}"], "unknown method 'kdd' (did you mean 'kd' or 'dkd'?)"),
    (CACHE + ["--views", "-1"], "--views must be >= 0 and <= 64, not -1"),
    (CACHE + ["--logits", "topk:10"], "--logits topk:10 needs k < 10 classes"),
    (CACHE + ["--cka-source", "pixels"], "Invalid value for '--cka-source': 'pixels' is not one of 'auto', "
                                         "'logits', 'features'"),
    (CACHE + ["--logits", "top5"], "Invalid value for '--logits': must be dense or topk:K (K > 0), not 'top5'"),
    (CACHE + ["--store", "logits,featmaps"], "--store lists featmaps, but these options produce no teacher feature maps"),
    (CACHE + ["--store", "logit"], "--store 'logit': ['logit'] are not per-sample targets"),
    (CACHE + ["--max-side", "0"], "Invalid value for '--max-side': Input should be greater than or equal to 1"),
    (CACHE + ["--inputs", "jpeg"], "Invalid value for '--inputs': must be raw, encoded, encoded:quality=Q"),
    (CACHE + ["--inputs", "encoded:quality=0"], "Invalid value for '--inputs': must be raw, encoded"),
    (CACHE + ["--inputs", "source"], "--inputs source reads each image from its file, and digits has none"),
    (CACHE + ["--task-runner", "ray"], "--task-runner must be thread, dask or a scheduler address"),
    # a cache of another teacher at --out: refused before any pass (and before Prefect), not inside it
    (CACHE + ["--out", "{cache}"], "{cache} holds a cache made with a different teacher."),
    pytest.param(CACHE[:-2] + ["--device", "cuda"], "this machine has no CUDA device", marks=CUDA),
    pytest.param(TRAIN + ["--cache", "{cache}", "--device", "cuda"], "this machine has no CUDA device", marks=CUDA),
    pytest.param(["fit-teacher", "--dataset", "digits", "--model", "test_resnet", "--device", "cuda"],
                 "this machine has no CUDA device", marks=CUDA),
    (["fit-teacher", "--dataset", "digits", "--model", "test_resnet", "--device", "tpu9"], "is not a device"),
    (["deploy", "{tmp}/missing.toml"], "deployment spec {tmp}/missing.toml does not exist"),
    (TRAIN + ["--cache", "{cache}", "--nproc", "0"], "--nproc 0: give a number of processes >= 1"),
    (TRAIN + ["--cache", "{cache}", "--nproc", "40"], "40 processes but the cache's 25 blocks leave rank(s)"),
])
def test_bad_input_fails_before_any_flow_in_one_line(args: list[str], message: str, digits_cache: Path,
                                                      tmp_path: Path, cli) -> None:
    fill = {"tmp": str(tmp_path), "cache": str(digits_cache)}
    args = [a.format(**fill) for a in args]
    if "--out" not in args and args[0] != "deploy":
        args += ["--out", str(tmp_path / "out")]
    # In this process and without a Prefect server: nothing may get as far as starting a flow.
    code, out = cli(*args)
    assert code == 2, out
    assert out.strip().count("\n") == 0 and out.startswith("error: "), out
    assert message.format(**fill) in out
    assert not (tmp_path / "out").exists()


def test_an_error_raised_inside_a_flow_run_reaches_the_cli_as_one_line(prefect_harness, digits_cache: Path,
                                                                       tmp_path: Path) -> None:
    from prefect.settings import get_current_settings

    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url)}
    # The out template is filled inside the flow run, from the run's name and date.
    result = distillery(TRAIN + ["--cache", str(digits_cache), "--out", f"{tmp_path}/{{night}}"], env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("error: unknown placeholder {night}")
    assert result.stdout == ""
