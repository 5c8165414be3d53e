"""Transformer teachers tapped as CNNs are: every stage a (B, C, H, W) map on the model's token grid (class,
distillation and register tokens left out, explicitly), pooled features from the model's own pooling and
logits from its own head."""

from __future__ import annotations

import pytest
import torch

from pipeline.nets.tapped import create_timm_model, stage_names, tap_indices, tapped_forward

TINY = {
    "swin": ("swin_tiny_patch4_window7_224", {"embed_dim": 16, "depths": (1, 1, 2, 1), "num_heads": (1, 1, 2, 2),
                                              "window_size": 4}),
    "convnext": ("test_convnext", {}),
    "vit-registers": ("vit_small_patch16_224", {"patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2,
                                                "reg_tokens": 3, "global_pool": "token"}),
    "vit-avg": ("test_vit2", {}),  # a register token, no class token, average pooling over the patch tokens
    "deit-distilled": ("deit_tiny_distilled_patch16_224", {"patch_size": 8, "embed_dim": 32, "depth": 2,
                                                           "num_heads": 2}),
}


def tiny(kind: str) -> torch.nn.Module:
    name, kwargs = TINY[kind]
    torch.manual_seed(0)
    return create_timm_model(name, 10, 3, 32, **kwargs).eval()


@pytest.mark.parametrize("kind", list(TINY))
def test_every_stage_is_a_map_on_the_models_grid_and_pooling_is_the_models_own(kind: str) -> None:
    model = tiny(kind)
    names = stage_names(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = tapped_forward(model, x, tuple(names), tap_indices(model, tuple(names)))
        own_pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        own_logits = model(x)
    for info in model.feature_info:
        grid = 32 // info["reduction"]
        assert out.maps[info["module"]].shape == (2, info["num_chs"], grid, grid), info["module"]
    torch.testing.assert_close(out.pooled, own_pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, own_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["vit-registers", "vit-avg", "deit-distilled"])
def test_vit_maps_are_the_patch_tokens_without_the_prefix(kind: str) -> None:
    model = tiny(kind)
    prefix = model.num_prefix_tokens  # class (+ distillation) + register tokens
    assert prefix == {"vit-registers": 4, "vit-avg": 1, "deit-distilled": 2}[kind]
    tap = stage_names(model)[-2]
    seen: list[torch.Tensor] = []
    hook = model.get_submodule(tap).register_forward_hook(lambda module, args, output: seen.append(output))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    try:
        with torch.inference_mode():
            fmap = tapped_forward(model, x, (tap,), tap_indices(model, (tap,))).maps[tap]
    finally:
        hook.remove()
    tokens = seen[0]
    grid = fmap.shape[-1]
    assert tokens.shape[1] == prefix + grid * grid
    patches = tokens[:, prefix:].transpose(1, 2).reshape(2, -1, grid, grid)
    torch.testing.assert_close(fmap, patches)
