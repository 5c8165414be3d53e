"""Bad inputs, bad options and run directories (issue 13): each is refused with one line naming the culprit,
exit code 2 from the CLI, before any work starts and with nothing written.

A few cases drive the real `distillery` CLI in a subprocess (each pays the CLI's start-up); the rest call the
library's validators, which the CLI and the Prefect flows share.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import DistilleryError

FIXTURE = Path(__file__).resolve().parents[2] / "data" / "digits-imagefolder"
UNWRITABLE = Path("/sys")  # sysfs refuses new files even to root, unlike a chmod-ed directory
CUDA_DEVICE_COUNT = __import__("torch").cuda.device_count()
MISSING_DEVICE = f"cuda:{max(CUDA_DEVICE_COUNT, 7)}"


def cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def assert_refused(result: subprocess.CompletedProcess, *culprits: str) -> str:
    """Exit 2, nothing on stdout, and one line on stderr that names every culprit."""
    line = result.stderr.strip()
    assert result.returncode == 2, result.stderr
    assert "\n" not in line and line.startswith("error: ") and result.stdout == "", result.stderr
    for culprit in culprits:
        assert culprit in line, line
    return line


def refused(call, error: type[Exception] = DistilleryError) -> str:
    """The one-line message of a library refusal."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def broken_imagefolder(root: Path, split: str, kind: str) -> Path:
    """A copy of the committed fixture with one undecodable image (kind: zero-byte, text, truncated) in `split`."""
    shutil.copytree(FIXTURE, root)
    bad = root / split / "one" / "broken.png"
    good = next((root / split / "one").glob("*.png")).read_bytes()
    bad.write_bytes({"zero-byte": b"", "text": b"hello, not an image", "truncated": good[: len(good) // 2]}[kind])
    return bad


# --- the real CLI ----------------------------------------------------------------------------------------------

def test_cli_cache_refuses_a_bad_option_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "cache"
    result = cli("cache", "--dataset", "digits", "--teacher", "test_resnet", "--out", str(out), "--device", "cpu",
                 "--batch-size", "0", home=tmp_path)
    assert_refused(result, "--batch-size must be >= 1 and <= 65536, not 0")
    assert not out.exists()


def test_cli_cache_refuses_an_imagefolder_with_a_bad_val_image_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    broken_imagefolder(folder, "val", "truncated")
    out = tmp_path / "cache"
    result = cli("cache", "--dataset", f"imagefolder:{folder}", "--teacher", "test_resnet", "--out", str(out),
                 "--device", "cpu", home=tmp_path)  # caches the train split: the val image is found all the same
    assert_refused(result, "val/one/broken.png", "--on-bad-image skip")
    assert not out.exists()


def test_cli_train_refuses_a_method_option_out_of_range(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = cli("train", "--cache", str(tmp_path / "cache"), "--student", "test_resnet", "--method", "ce",
                 "--method", "kd:T=-1", "--out", str(out), home=tmp_path)
    assert_refused(result, "method 'kd': option 'T' must be >= 0.01 and <= 100, not -1.0")
    assert not out.exists()


def test_cli_fit_teacher_refuses_an_unwritable_out_before_training(tmp_path: Path) -> None:
    result = cli("fit-teacher", "--dataset", "digits", "--model", "test_resnet", "--out",
                 str(UNWRITABLE / "teacher.pt"), "--epochs", "50", home=tmp_path)
    assert_refused(result, "--out /sys/teacher.pt: cannot write in /sys")


def test_cli_train_on_a_run_directory_in_use_names_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "test_resnet-ce-s0"  # the student's run directory in --out, started
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipeline.train.rundir import RunDir\n"
                               "with RunDir(sys.argv[1]).locked():\n    print('held', flush=True); time.sleep(300)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        result = cli("train", "--cache", str(tmp_path / "cache"), "--student", "test_resnet", "--method", "ce",
                     "--out", str(out.parent), "--resume", home=tmp_path)
        assert_refused(result, f"{out} is in use by another run (pid {holder.pid} on ", "choose another --out")
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "run.lock", "run.lock.json"]
    finally:
        holder.kill()
        holder.wait()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    """Running or sleeping; a zombie (dead, not yet reaped by whoever adopted it) does not count."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_prefect_temporary_server_dies_with_a_killed_cli(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    command = subprocess.Popen([sys.executable, "-m", "flows.cli", "cache", "--dataset", "digits", "--teacher",
                                "test_resnet", "--out", str(tmp_path / "cache"), "--views", "0", "--device", "cpu",
                                # without PREFECT_API_URL only a Dask-fanned pass is a flow run on the temporary server
                                "--task-runner", "dask", "--dask-workers", "1"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    try:
        deadline = time.monotonic() + 240
        while server is None and time.monotonic() < deadline and command.poll() is None:
            server = next((c for c in _children(command.pid)
                           if b"uvicorn" in Path(f"/proc/{c}/cmdline").read_bytes()), None)
            time.sleep(0.2)
        assert server is not None, "the CLI never started Prefect's temporary server"
        command.send_signal(signal.SIGKILL)
        command.wait()
        deadline = time.monotonic() + 5
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(server), f"Prefect's temporary server (pid {server}) outlived the killed CLI"
    finally:
        command.kill()
        if server is not None and _alive(server):
            os.kill(server, signal.SIGKILL)


# --- the library validators the CLI and the flows share ----------------------------------------------------------

def _cache_request(out: Path, **fields):
    from pipeline.teacher.plan import CacheRequest

    return CacheRequest(**{"dataset": "digits", "teacher": "test_resnet", "out": str(out), "device": "cpu", **fields})


@pytest.mark.parametrize("fields, message", [
    ({"views": -1}, "--views must be >= 0 and <= 64, not -1"),
    ({"grid": 0}, "--grid must be >= 1 and <= 64, not 0"),
    ({"batch_size": 0}, "--batch-size must be >= 1 and <= 65536, not 0"),
    ({"shard_size": 0}, "--shard-size must be >= 1 and <= 65536, not 0"),
    ({"input_size": -5}, "--input-size must be >= 8 and <= 1024, not -5"),
    ({"input_size": 0}, "--input-size must be >= 8 and <= 1024, not 0"),
    ({"subset": -3}, "--subset must be >= 1, not -3"),
    ({"lsh_bits": -8}, "--lsh-bits must be >= 0 and <= 4096, not -8"),
    ({"teacher_tail": -1}, "--teacher-tail must be >= 0 and <= 64, not -1"),
    ({"views": "many"}, "--views: input should be a valid integer"),
    ({"on_bad_image": "ignore"}, "--on-bad-image must be one of fail, skip, not 'ignore'"),
])
def test_cache_request_option_out_of_range(tmp_path: Path, fields, message) -> None:
    assert refused(lambda: _cache_request(tmp_path / "cache", **fields)).startswith(message)
    assert not (tmp_path / "cache").exists()


def test_cache_request_checks_out_device_and_subset_before_writing(tmp_path: Path) -> None:
    from pipeline.teacher.plan import check_request

    (tmp_path / "file").write_text("x")
    assert "is a file, not a directory" in refused(lambda: check_request(_cache_request(tmp_path / "file")))
    assert "cannot write in /sys" in refused(lambda: check_request(_cache_request(UNWRITABLE / "cache")))
    assert f"--device {MISSING_DEVICE}" in refused(
        lambda: check_request(_cache_request(tmp_path / "c", device=MISSING_DEVICE)))
    assert "subset 5 must lie between the number of classes present (10)" in refused(
        lambda: check_request(_cache_request(tmp_path / "c", subset=5)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("kind", ["zero-byte", "text", "truncated"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_cache_request_refuses_a_bad_image_in_either_split(tmp_path: Path, kind, split) -> None:
    from pipeline.teacher.plan import check_request

    broken_imagefolder(tmp_path / "images", split, kind)
    message = refused(lambda: check_request(_cache_request(tmp_path / "c", dataset=f"imagefolder:{tmp_path / 'images'}")))
    assert f"1 undecodable image file(s): {split}/one/broken.png" in message and "--on-bad-image skip" in message
    assert not (tmp_path / "c").exists()


def test_cache_with_skip_leaves_the_bad_image_out_and_records_it(tmp_path: Path) -> None:
    from pipeline.teacher.plan import check_request

    broken_imagefolder(tmp_path / "images", "train", "zero-byte")
    manifest = check_request(_cache_request(tmp_path / "c", dataset=f"imagefolder:{tmp_path / 'images'}",
                                            on_bad_image="skip"))
    assert manifest.dataset.num_samples == 36 and manifest.dataset.skipped == ["train/one/broken.png"]


def test_an_empty_class_folder_is_refused_by_name(tmp_path: Path) -> None:
    from pipeline.teacher.plan import check_request

    shutil.copytree(FIXTURE, tmp_path / "images")
    (tmp_path / "images" / "train" / "three").mkdir()
    message = refused(lambda: check_request(_cache_request(tmp_path / "c", dataset=f"imagefolder:{tmp_path / 'images'}")))
    assert "class folder train/three has no images" in message


@pytest.mark.parametrize("settings, message", [
    ({"epochs": 0}, "--epochs must be >= 1 and <= 100000, not 0"),
    ({"epochs": 10 ** 9}, "--epochs must be >= 1 and <= 100000, not 1000000000"),
    ({"seed": 10 ** 20}, "--seed must be >= 0 and <= 4294967295, not 100000000000000000000"),
    ({"workers": 10 ** 6}, "--workers must be >= 0 and <= 64, not 1000000"),
    ({"epochs": -2}, "--epochs must be >= 1 and <= 100000, not -2"),
    ({"input_size": 0}, "--input-size must be >= 8 and <= 1024, not 0"),
    ({"optim": {"lr": float("nan")}}, "--lr must be > 0 and <= 10, not nan"),
    ({"optim": {"lr": float("inf")}}, "--lr must be > 0 and <= 10, not inf"),
    ({"optim": {"lr": -1e-3}}, "--lr must be > 0 and <= 10, not -0.001"),
    ({"optim": {"warmup_epochs": -1.0}}, "--warmup-epochs must be >= 0 and <= 100000, not -1.0"),
    ({"optim": {"lr": 1e308}}, "--lr must be > 0 and <= 10, not 1e+308"),
    ({"optim": {"weight_decay": 1e308}}, "--weight-decay must be >= 0 and <= 10, not 1e+308"),
    ({"optim": {"clip_grad": 1e308}}, "--clip-grad must be > 0 and <= 10000, not 1e+308"),
    ({"optim": {"warmup_epochs": 1e9}}, "--warmup-epochs must be >= 0 and <= 100000, not 1000000000.0"),
])
def test_train_setting_out_of_range(settings, message) -> None:
    from pipeline.train.config import RunSettings

    assert refused(lambda: RunSettings(**settings)) == message


@pytest.mark.parametrize("spec, message", [
    ("kd:T=-1", "method 'kd': option 'T' must be >= 0.01 and <= 100, not -1.0"),
    ("kd:alpha=-1", "method 'kd': option 'alpha' must be >= 0 and <= 10000, not -1.0"),
    ("dkd:beta=nan", "method 'dkd': option 'beta' must be >= 0 and <= 10000, not nan"),
    ("dkd:T=0", "method 'dkd': option 'T' must be >= 0.01 and <= 100, not 0.0"),
    ("ce:label_smoothing=-0.1", "method 'ce': option 'label_smoothing' must be >= 0 and <= 1, not -0.1"),
    ("fitnet:weight=-1", "method 'fitnet': option 'weight' must be >= 0 and <= 10000, not -1.0"),
    ("elsh:beta=-5", "method 'elsh': option 'beta' must be >= 0 and <= 10000, not -5.0"),
    ("scalekd:heads=0", "method 'scalekd': option 'heads' must be >= 1 and <= 64, not 0"),
    ("tcs:keep=2", "method 'tcs': option 'keep' must be > 0 and <= 1, not 2.0"),
    ("wkd_f:gamma=-1", "method 'wkd_f': option 'gamma' must be >= 0 and <= 10000, not -1.0"),
    ("wkd_l:sinkhorn_iters=0", "method 'wkd_l': option 'sinkhorn_iters' must be >= 1 and <= 1000, not 0"),
    ("wkd_l:kappa=inf", "method 'wkd_l': option 'kappa' must be > 0 and <= 100, not inf"),
    ("wkd_f:hidden=1000000000", "method 'wkd_f': option 'hidden' must be >= 1 and <= 8192, not 1000000000"),
    ("tcs:rounds=1000000000", "method 'tcs': option 'rounds' must be >= 1 and <= 1000, not 1000000000"),
    ("kd:T=1e-320", "method 'kd': option 'T' must be >= 0.01 and <= 100, not 1e-320"),
    ("kd:alpha=1e308", "method 'kd': option 'alpha' must be >= 0 and <= 10000, not 1e+308"),
])
def test_method_option_out_of_range_is_refused_when_the_run_is_configured(spec, message) -> None:
    from pipeline.train.config import StudentSpec

    assert refused(lambda: StudentSpec(student="test_resnet", methods=("ce", spec))) == message


def test_train_checks_device_and_out_before_opening_anything(tmp_path: Path) -> None:
    from pipeline.train.config import RunSettings, TrainConfig
    from pipeline.train.loop import check_run

    (tmp_path / "file").write_text("x")
    config = lambda out, **s: TrainConfig(cache=str(tmp_path / "no-cache"), student="test_resnet",  # noqa: E731
                                          methods=("ce",), out=str(out), settings=RunSettings(**s))
    assert "is a file, not a directory" in refused(lambda: check_run(config(tmp_path / "file")))
    assert "cannot write in /sys" in refused(lambda: check_run(config(UNWRITABLE / "run")))
    assert f"--device {MISSING_DEVICE}" in refused(lambda: check_run(config(tmp_path / "r", device=MISSING_DEVICE)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("fields, message", [
    ({"epochs": 0}, "--epochs must be >= 1 and <= 100000, not 0"),
    ({"epochs": 10 ** 9}, "--epochs must be >= 1 and <= 100000, not 1000000000"),
    ({"seed": 10 ** 20}, "--seed must be >= 0 and <= 4294967295, not 100000000000000000000"),
    ({"workers": 10 ** 6}, "--workers must be >= 0 and <= 64, not 1000000"),
    ({"lr": float("nan")}, "--lr must be > 0 and <= 10, not nan"),
    ({"lr": 1e308}, "--lr must be > 0 and <= 10, not 1e+308"),
    ({"weight_decay": 1e308}, "--weight-decay must be >= 0 and <= 10, not 1e+308"),
    ({"temperature": 1e-320}, "--temperature must be >= 0.01 and <= 100, not 1e-320"),
    ({"input_size": 0}, "--input-size must be >= 8 and <= 1024, not 0"),
    ({"subset": 0}, "--subset must be >= 1, not 0"),
])
def test_fit_option_out_of_range(tmp_path: Path, fields, message) -> None:
    from pipeline.train.fit import FitConfig

    assert refused(lambda: FitConfig(dataset="digits", model="test_resnet", out=str(tmp_path / "t.pt"),
                                     **fields)) == message


@pytest.mark.parametrize("out, message", [("dir", "is a directory; give a file path"),
                                          ("/sys/t.pt", "cannot write in /sys")])
def test_fit_refuses_an_unwritable_out_and_a_bad_val_image_before_the_first_step(tmp_path: Path, out, message) -> None:
    from pipeline import progress
    from pipeline.train.fit import FitConfig, fit_teacher

    class Recorder:
        started: list[str] = []

        def start(self, key, description, total, unit):
            self.started.append(description)

        def advance(self, key, amount): ...

        def finish(self, key): ...

    (tmp_path / "dir").mkdir()
    progress.set_reporter(Recorder())
    try:
        assert message in refused(lambda: fit_teacher(FitConfig(dataset="digits", model="test_resnet",
                                                                out=str(tmp_path / out), epochs=1, workers=0)))
        broken_imagefolder(tmp_path / "images", "val", "text")
        bad_val = refused(lambda: fit_teacher(FitConfig(dataset=f"imagefolder:{tmp_path / 'images'}",
                                                        model="test_resnet", out=str(tmp_path / "t.pt"), epochs=1,
                                                        workers=0)))
        assert "val/one/broken.png" in bad_val
    finally:
        progress.set_reporter(None)
    assert Recorder.started == [] and not (tmp_path / "t.pt").exists()  # no training loop ever started
