"""`distillery fit-teacher --objective ssl`: SimCLR's NT-Xent, the two-view batches, and a label-free teacher
whose head-less cache trains TCS and eLSH."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.options import OptionError
from pipeline.train.fit import FitConfig, fit_teacher, nt_xent, pair_batches


def test_nt_xent_matches_the_direct_formula() -> None:
    torch.manual_seed(0)
    a, b, tau = torch.randn(3, 5), torch.randn(3, 5), 0.5
    z = [F.normalize(v, dim=0) for v in torch.cat([a, b])]
    total = 0.0
    for i in range(6):
        positive = (i + 3) % 6
        denominator = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(6) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[positive]) / tau) / denominator)
    assert nt_xent(a, b, tau).item() == pytest.approx(total / 6, rel=1e-5)


def test_pair_batches_put_both_views_of_each_sample_in_one_batch() -> None:
    batches = pair_batches(10, 4, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [8, 8, 4]
    firsts = [i for b in batches for i in b[: len(b) // 2]]
    assert sorted(firsts) == list(range(10))
    assert all(b[len(b) // 2:] == [i + 10 for i in b[: len(b) // 2]] for b in batches)


def test_bad_objective_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match=r"^--objective must be one of supervised, ssl, not 'byol'$"):
        fit_teacher(FitConfig(dataset="digits", model="test_resnet", out=str(tmp_path / "t.pt"), objective="byol"))


def test_ssl_teacher_head_less_cache_trains_tcs_and_elsh(cache_request, tmp_path: Path) -> None:
    from pipeline.teacher.cache_pass import run_cache_pass
    from pipeline.teacher.checkpoint import TeacherCheckpoint
    from pipeline.train.config import RunSettings, TrainConfig
    from pipeline.train.loop import train_student

    out = tmp_path / "ssl.pt"
    result = fit_teacher(FitConfig(dataset="digits", model="test_resnet", out=str(out), epochs=1, subset=256,
                                   batch_size=64, workers=0, objective="ssl"))
    ckpt = TeacherCheckpoint.load(out)
    assert result.val_accuracy is None and ckpt.val_accuracy is None and ckpt.config["objective"] == "ssl"
    assert not any(k.startswith("0.") for k in ckpt.state_dict)  # the projector is not part of the teacher
    cache = tmp_path / "cache"
    run_cache_pass(cache_request(cache, checkpoint=str(out), teacher_head=False, subset=200, views=0, lsh_bits=32,
                                 shard_size=100, block_size=50))
    settings = RunSettings(epochs=1, batch_size=32, workers=0)
    summary = train_student(TrainConfig(cache=str(cache), student="test_resnet", methods=("ce", "tcs", "elsh"),
                                        out=str(tmp_path / "run"), settings=settings))
    assert np.isfinite(summary.val_accuracy) and (tmp_path / "run" / "student.pt").is_file()


@pytest.mark.parametrize("channels", [1, 3])
def test_photometric_jitter_is_torchvisions_brightness_then_contrast_on_four_views_in_five(channels: int) -> None:
    from torchvision.transforms import functional as TF

    from pipeline.train.fit import photometric_jitter

    mean, std = (0.3,) * channels, (0.2,) * channels
    pixels = torch.rand(400, channels, 6, 6, generator=torch.Generator().manual_seed(1))
    x = (pixels - 0.3) / 0.2
    out = photometric_jitter(x, mean, std, 0.5, torch.Generator().manual_seed(7))
    draws = torch.Generator().manual_seed(7)
    factors = 0.6 + 0.8 * torch.rand(2, 400, 1, 1, 1, generator=draws)
    applied = torch.rand(400, 1, 1, 1, generator=draws) < 0.8
    for i in range(400):
        expected = pixels[i]
        if applied[i]:
            expected = TF.adjust_contrast(TF.adjust_brightness(expected, float(factors[0, i])), float(factors[1, i]))
        torch.testing.assert_close(out[i] * 0.2 + 0.3, expected, atol=1e-5, rtol=0)
    assert 0.7 < applied.float().mean() < 0.9 and not torch.equal(out, x)
    assert photometric_jitter(x, mean, std, 0.0, torch.Generator()) is x
