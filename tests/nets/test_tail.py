"""ScaleKD's teacher tail: rebuilt from its spec alone, it computes what the teacher's own stages compute."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.nets.tail import build_teacher_tail, check_teacher_tail, extract_teacher_tail
from pipeline.nets.tapped import ModelError, create_timm_model, stage_names

SWIN = ("swin_tiny_patch4_window7_224", {"embed_dim": 16, "depths": (1, 1, 2, 2), "num_heads": (1, 1, 2, 2),
                                         "window_size": 4})


def teacher(name: str, size: int = 32, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_timm_model(name, 10, 1, size, **kwargs).eval()
    # Non-trivial BatchNorm statistics: the tail must carry the teacher's buffers, not fresh ones.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


def rebuilt(model: torch.nn.Module, stages: int, tap_index: int = -1):
    tap = stage_names(model)[tap_index]
    probe = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    spec, state = extract_teacher_tail(model, tap, stages, probe)
    spec = json.loads(json.dumps(spec))  # what is saved is plain JSON-able values
    tail = build_teacher_tail(spec, state)
    check_teacher_tail(spec, state, tail.output_shape, 32)  # what a cache's reader checks: every family passes
    return tap, tail


@pytest.mark.parametrize("name, kwargs, stages", [
    ("test_resnet", {}, 2),  # a Bottleneck stage then a BasicBlock stage, average-pool shortcuts
    ("test_resnet", {"avg_down": False}, 1),  # strided 1x1 convolution shortcut
    (*SWIN, 2),
    ("test_vit", {"class_token": False, "global_pool": "avg"}, 2),  # no prefix token: the map is the tail's
    ("test_convnext", {}, 2),  # downsampling stages, layer scale, channels-last LayerNorm MLP
    ("convnext_atto", {"depths": (1, 1, 1, 1), "dims": (8, 16, 16, 32), "conv_mlp": True}, 3),  # channels-first
])
def test_tail_maps_the_previous_stage_to_the_cached_stage_exactly(name, kwargs, stages) -> None:
    model = teacher(name, **kwargs)
    tap, tail = rebuilt(model, stages)
    names = stage_names(model)
    x = torch.randn(3, 1, 32, 32)
    with torch.inference_mode():
        _, maps = model.forward_intermediates(x, indices=list(range(len(names))))
        by_name = dict(zip(names, maps))
        before = by_name[names[names.index(tap) - stages]]
        torch.testing.assert_close(tail(before), by_name[tap], rtol=1e-5, atol=1e-5)
    assert tail.input_shape == tuple(before.shape[1:]) and tail.output_shape == tuple(by_name[tap].shape[1:])


def test_vit_tail_equals_the_teachers_blocks_on_spatial_tokens() -> None:
    model = teacher("test_vit")
    _, tail = rebuilt(model, 2)
    tokens = torch.randn(3, 4, 64)  # 2x2 spatial tokens of width 64, no class token
    with torch.inference_mode():
        reference = model.blocks[-1](model.blocks[-2](tokens))
        out = tail(tokens.transpose(1, 2).reshape(3, 64, 2, 2))
    torch.testing.assert_close(out.flatten(2).transpose(1, 2), reference, rtol=1e-5, atol=1e-5)


def test_tail_is_frozen_and_passes_gradients_to_its_input() -> None:
    _, tail = rebuilt(teacher("test_resnet"), 1)
    tail.train()
    assert not tail.training and not any(p.requires_grad for p in tail.parameters())
    x = torch.randn(4, *tail.input_shape, requires_grad=True)
    tail(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in tail.parameters())


@pytest.mark.parametrize("name, kwargs", [
    ("test_vit2", {}),  # a class and a register token
    ("deit_tiny_distilled_patch16_224", {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}),
])
def test_vit_tails_with_prefix_tokens_take_the_patch_grid(name: str, kwargs: dict) -> None:
    model = teacher(name, **kwargs)
    _, tail = rebuilt(model, 2)
    grid = 32 // model.patch_embed.patch_size[0]
    assert tail.input_shape == (model.embed_dim, grid, grid)  # prefix tokens are not positions of the map
    tokens = torch.randn(3, grid * grid, model.embed_dim)
    with torch.inference_mode():
        reference = model.blocks[-1](model.blocks[-2](tokens))
        out = tail(tokens.transpose(1, 2).reshape(3, model.embed_dim, grid, grid))
    torch.testing.assert_close(out.flatten(2).transpose(1, 2), reference, rtol=1e-5, atol=1e-5)


def test_a_teacher_of_another_family_is_refused() -> None:
    model = teacher("test_efficientnet")
    with pytest.raises(ModelError, match="ResNet, Swin, ConvNeXt and ViT models only, not a EfficientNet.*tpp=false"):
        rebuilt(model, 1)


def test_a_variant_the_block_classes_do_not_rebuild_is_refused() -> None:
    model = teacher("test_resnet", block_args={"attn_layer": "se"})  # squeeze-excitation inside every block
    with pytest.raises(ModelError, match="variant that timm's block classes do not rebuild"):
        rebuilt(model, 1)


@pytest.mark.parametrize("stages", [0, 5])
def test_a_stage_count_out_of_range_names_the_valid_range(stages: int) -> None:
    with pytest.raises(ModelError, match=r"--teacher-tail must be 1\.\.4 for tap layer4") as info:
        rebuilt(teacher("test_resnet"), stages)
    assert "\n" not in str(info.value)


def test_a_spec_of_another_format_is_refused() -> None:
    with pytest.raises(ModelError, match="not a teacher tail spec"):
        build_teacher_tail({"format": "something-else/9", "family": "resnet"})
