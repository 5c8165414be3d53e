"""Students: any timm model, exposing logits, pooled pre-logits and stage maps like the teacher."""

from __future__ import annotations

import pytest
import torch

from pipeline.nets.tapped import ModelError
from pipeline.train.student import Student


def test_outputs_are_the_timm_models_own_and_taps_are_its_stage_maps() -> None:
    torch.manual_seed(0)
    student = Student("test_resnet", num_classes=7, in_chans=1, input_size=32, taps=("layer2", -1)).eval()
    x = torch.randn(3, 1, 32, 32)
    out = student(x)
    torch.testing.assert_close(out.logits, student.model(x))
    assert out.pooled.shape == (3, student.pooled_dim)
    assert list(out.feature_maps) == ["layer2", "layer4"]
    _, maps = student.model.forward_intermediates(x, indices=[2, 4])
    for got, expected in zip(out.feature_maps.values(), maps):
        torch.testing.assert_close(got, expected)
    assert Student("test_resnet", 7, 1, 32)(x).feature_maps == {}


def test_pooled_dim_is_measured_not_taken_from_num_features() -> None:
    # MobileNetV3's pre-logits come out of its conv head (1024 wide), not its last stage (288).
    student = Student("mobilenetv3_small_050", num_classes=10, in_chans=1, input_size=32)
    assert student.pooled_dim == 1024 != student.model.num_features
    assert student.training  # the probe leaves the mode as it found it


def test_unknown_models_and_taps_are_one_line_errors() -> None:
    with pytest.raises(ModelError, match="unknown timm model 'resnet_nope'"):
        Student("resnet_nope", 10, 1, 32)
    with pytest.raises(ModelError, match="unknown tap 'layer9'"):
        Student("test_resnet", 10, 1, 32, taps=("layer9",))
