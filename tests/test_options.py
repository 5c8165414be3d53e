"""`pipeline.options`: ranges, devices and output locations, each refused in one line naming the option."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.options import OptionError, Range, check_device, check_output_dir, check_output_file

UNWRITABLE = Path("/sys")  # sysfs refuses new files even to root, unlike a chmod-ed directory


def test_a_range_refuses_values_outside_it_and_every_non_finite_value() -> None:
    r = Range(gt=0, le=1)
    assert r.contains(1.0) and r.contains(1e-9) and not r.contains(0.0) and not r.contains(1.5)
    assert not Range().contains(float("nan")) and not Range(ge=0).contains(float("inf"))
    with pytest.raises(OptionError) as info:
        r.check("--x", -2)
    assert str(info.value) == "--x must be > 0 and <= 1, not -2"
    r.check("--x", None)  # not given


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_cpu_and_auto_are_always_accepted(device: str) -> None:
    check_device(device)


def test_a_cuda_device_this_machine_lacks_is_refused_saying_what_it_has() -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(OptionError, match=r"--device cuda:7: this machine has" if count else
                       r"--device cuda:7: this machine has no CUDA device; use --device cpu \(or auto\)"):
        check_device("cuda:7" if count < 8 else f"cuda:{count}")
    if count == 0:
        with pytest.raises(OptionError, match="--device cuda: this machine has no CUDA device"):
            check_device("cuda")
    with pytest.raises(OptionError, match="--device 'gpu0' is not a device; use auto, cpu or cuda"):
        check_device("gpu0")


def test_an_output_directory_must_be_a_writable_directory_and_nothing_is_created(tmp_path: Path) -> None:
    check_output_dir(tmp_path / "new" / "deeper")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OptionError, match=rf"--out {tmp_path / 'file'} is a file, not a directory"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(OptionError, match=rf"--out {tmp_path / 'file' / 'sub'}: {tmp_path / 'file'} is a file"):
        check_output_dir(tmp_path / "file" / "sub")
    with pytest.raises(OptionError, match=r"--out /sys/run: cannot write in /sys \(Permission denied\)"):
        check_output_dir(UNWRITABLE / "run")
    with pytest.raises(OptionError, match=r"--out /sys: cannot write in /sys"):
        check_output_dir(UNWRITABLE)


def test_an_output_file_must_not_be_a_directory_and_its_parent_must_be_writable(tmp_path: Path) -> None:
    check_output_file(tmp_path / "sub" / "teacher.pt")
    with pytest.raises(OptionError, match=rf"--out {tmp_path} is a directory; give a file path such as"):
        check_output_file(tmp_path)
    with pytest.raises(OptionError, match=r"--out /sys/teacher.pt: cannot write in /sys"):
        check_output_file(UNWRITABLE / "teacher.pt")
    assert list(tmp_path.iterdir()) == []
