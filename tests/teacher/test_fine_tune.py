"""`fit-teacher --weights`: fine-tuning starts from the user's weights (resolved as `cache --weights` resolves
them), the checkpoint records their sha256, and a cache of the fine-tuned teacher verifies; bad weights are
one line, exit 2, before anything is fitted."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from pipeline.checksums import sha256_file
from pipeline.teacher.cache_pass import run_cache_pass
from pipeline.teacher.checkpoint import TeacherCheckpoint
from pipeline.teacher.plan import CacheRequest
from pipeline.teacher.verify import verify_cache
from pipeline.train.fit import FitConfig, fit_teacher


@pytest.fixture(scope="module")
def imagenet_resnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A test_resnet with timm's 1000-class head, as .safetensors: a head the 10 digit classes do not fit."""
    torch.manual_seed(1)
    model = timm.create_model("test_resnet").eval()
    path = tmp_path_factory.mktemp("start") / "test_resnet-in1k.safetensors"
    safetensors.torch.save_file(model.state_dict(), path)
    return model, path


def test_fine_tuning_starts_from_the_weights_and_records_them(imagenet_resnet, tmp_path: Path) -> None:
    model, path = imagenet_resnet
    out = tmp_path / "teacher.pt"
    # A learning rate too small to move anything: the checkpoint's trunk is the weights' trunk.
    fit_teacher(FitConfig(dataset="digits", model="test_resnet", out=str(out), weights=str(path), epochs=1,
                          subset=40, input_size=32, lr=1e-12, batch_size=20, workers=0, device="cpu"))
    ckpt = TeacherCheckpoint.load(out)
    assert (ckpt.start_weights, ckpt.start_weights_sha256) == (str(path), sha256_file(path))
    assert (ckpt.num_classes, ckpt.in_chans, ckpt.input_size) == (10, 1, 32)
    assert ckpt.mean == (0.5,) and ckpt.std == (0.5,)  # the weights' normalisation, not the digits' statistics
    assert ckpt.state_dict["fc.weight"].shape == (10, model.num_features)  # a new head of the dataset's size
    for name in ("layer4.0.conv2.weight", "layer4.0.bn2.weight"):
        torch.testing.assert_close(ckpt.state_dict[name], model.state_dict()[name], rtol=0, atol=1e-6)
    # timm's one-channel stem: the RGB kernels summed
    torch.testing.assert_close(ckpt.state_dict["conv1.0.weight"], model.state_dict()["conv1.0.weight"].sum(1, True),
                               rtol=0, atol=1e-5)
    cache = tmp_path / "cache"
    run_cache_pass(CacheRequest(dataset="digits", subset=24, teacher="test_resnet", checkpoint=str(out),
                                out=str(cache), views=1, shard_size=24, device="cpu"))
    assert verify_cache(cache, samples=8).ok


def test_a_fit_from_random_weights_keeps_the_checkpoint_format(tmp_path: Path) -> None:
    out = tmp_path / "teacher.pt"
    fit_teacher(FitConfig(dataset="digits", model="test_resnet", out=str(out), epochs=1, subset=20, input_size=16,
                          batch_size=20, workers=0, device="cpu"))
    on_disk = torch.load(out, weights_only=True)
    assert "start_weights" not in on_disk and TeacherCheckpoint.load(out).start_weights_sha256 is None


def test_bad_starting_weights_are_one_line(cli, imagenet_resnet, tmp_path: Path) -> None:
    _, path = imagenet_resnet
    base = ["fit-teacher", "--dataset", "digits", "--out", str(tmp_path / "t.pt"), "--device", "cpu"]
    cases = {
        "does not exist": ["--model", "test_resnet", "--weights", str(tmp_path / "absent.safetensors")],
        "cannot be loaded into test_vit": ["--model", "test_vit", "--weights", str(path)],
        "is not in the local Hugging Face cache": ["--model", "test_resnet", "--weights", "hf-hub:nobody/absent"],
        "--patch-size cannot change the architecture": ["--model", "test_resnet", "--weights", str(path),
                                                        "--patch-size", "4"],
    }
    for expected, args in cases.items():
        code, output = cli(*base, *args)
        assert code == 2 and expected in output and len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / "t.pt").exists()
