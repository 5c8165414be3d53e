"""A register-token ViT brought as weights, cached end to end: its pooled features are its own
forward_head(pre_logits=True), its tap and Gaussian statistics live on the patch-token grid, and the saved
TPP tail computes the teacher's own blocks on that grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from pipeline.cache.reader import TeacherCache
from pipeline.data.datasets import load_dataset
from pipeline.data.views import ViewPlan
from pipeline.nets.tail import build_teacher_tail
from pipeline.teacher.cache_pass import run_cache_pass
from pipeline.teacher.forward import render_pairs
from pipeline.teacher.model import manifest_teacher_spec
from pipeline.teacher.plan import CacheRequest
from pipeline.teacher.weights import resolve_weights


@pytest.mark.slow  # ~20 s on the shared 2-core machine: a whole cache pass with featmaps, tail and statistics
def test_a_register_token_vit_is_cached_on_its_token_grid(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = timm.create_model("test_vit2", num_classes=10).eval()  # a register token, average pooling
    weights = tmp_path / "vit2.safetensors"
    safetensors.torch.save_file(vit.state_dict(), weights)
    out = tmp_path / "c"
    run_cache_pass(CacheRequest(dataset="digits", subset=12, teacher="test_vit2", weights=str(weights),
                                input_size=64, out=str(out), views=1, grid=2, featmaps=True, teacher_tail=2,
                                shard_size=12, device="cpu"))
    cache = TeacherCache(out)
    spec = manifest_teacher_spec(cache.manifest.teacher)
    tap = spec.taps[0]
    grid = 64 // vit.patch_embed.patch_size[0]
    assert tap == "blocks.7" and cache.read(f"featmaps/{tap}").shape[2:] == (vit.embed_dim, grid, grid)
    assert cache.read("gaussian/mean").shape[2:] == (4, vit.embed_dim)  # per cell of the 2x2 grid
    # The model as the cache holds it: timm's one-channel stem for the grey digits, run on the cached views.
    adapted = resolve_weights(str(weights), "test_vit2", num_classes=10, in_chans=1).model
    dataset = load_dataset("digits", split="train", subset=12, seed=0)
    pairs = np.array([(p, v) for p in range(len(dataset)) for v in range(2)], dtype=np.int64)
    x = render_pairs(dataset, ViewPlan(**cache.manifest.views.plan_fields()), pairs, spec)
    with torch.inference_mode():
        features = adapted.forward_features(x)
        pooled = adapted.forward_head(features, pre_logits=True)
        _, maps = adapted.forward_intermediates(x, indices=[5, 7])
    pooled_cached = cache.read("features/pooled")
    torch.testing.assert_close(torch.from_numpy(pooled_cached.reshape(len(pairs), -1).astype(np.float32)), pooled,
                               rtol=1e-2, atol=1e-2)
    tail = build_teacher_tail(*cache.teacher_tail())
    with torch.inference_mode():
        reference = adapted.blocks[7](adapted.blocks[6](maps[0].flatten(2).transpose(1, 2)))
        torch.testing.assert_close(tail(maps[0]), reference.transpose(1, 2).reshape(maps[1].shape),
                                   rtol=1e-4, atol=1e-4)
