"""Teacher construction and taps across timm families."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.nets.tapped import ModelError, create_timm_model, resolve_tap
from pipeline.teacher.model import TeacherError, TeacherSpec, build_teacher


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_convnext", "test_efficientnet"])
def test_taps_come_from_one_pass_and_logits_equal_the_plain_forward(name: str) -> None:
    torch.manual_seed(0)
    spec = TeacherSpec(model=name, num_classes=7, in_chans=1, input_size=32, mean=(0.5,), std=(0.5,), taps=("-1",))
    spec = spec.model_copy(update={"taps": (resolve_tap(create_timm_model(name, 7, 1, 32), -1),)})
    teacher = build_teacher(spec)
    x = torch.randn(3, 1, 32, 32)
    with torch.inference_mode():
        out = teacher(x)
        ref = teacher.model(x)
    torch.testing.assert_close(out.logits, ref)
    assert out.pooled.shape[0] == 3 and out.pooled.ndim == 2
    (fmap,) = out.maps.values()
    assert fmap.ndim == 4 and fmap.shape[0] == 3
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_head_less_teacher_returns_no_logits_and_the_same_pooled_features() -> None:
    spec = TeacherSpec(model="test_resnet", num_classes=5, in_chans=3, input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    torch.manual_seed(0)
    with_head = build_teacher(spec)
    headless = build_teacher(spec.model_copy(update={"head": False}))
    headless.model.load_state_dict({k: v for k, v in with_head.model.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        a, b = with_head(x), headless(x)
    assert b.logits is None
    torch.testing.assert_close(a.pooled, b.pooled)


def test_resolve_tap_by_name_and_index_with_clear_errors() -> None:
    model = create_timm_model("resnet18", 10, 1, 32)
    assert resolve_tap(model, "layer3") == "layer3"
    assert resolve_tap(model, -1) == "layer4" and resolve_tap(model, "0") == "act1"
    with pytest.raises(ModelError, match="stages of this model are"):
        resolve_tap(model, "layer9")
    with pytest.raises(ModelError, match="out of range"):
        resolve_tap(model, 7)


def test_a_checkpoint_of_another_model_is_refused_naming_it(digits_teacher: Path) -> None:
    spec = TeacherSpec(model="test_vit", num_classes=10, in_chans=1, input_size=32, mean=(0.5,), std=(0.5,),
                       checkpoint=str(digits_teacher))
    with pytest.raises(TeacherError, match="holds a 'test_resnet'"):
        build_teacher(spec)
