"""eLSH (docs/methods.md#elsh): BCE between the student's bit logits and the cached codes, the optional LSHL2 term,
and the refusals naming how to add LSH to a cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.methods import (LSH_CODES, POOLED, CacheInfo, MethodError, StudentInfo, StudentOutputs,
                              TrainingProgress, create_method)

D, BITS = 6, 16
PROGRESS = TrainingProgress(epoch=0, step=0, steps_per_epoch=1, total_epochs=1)


def lsh_cache(available=frozenset({LSH_CODES, POOLED}), seed: int = 0) -> CacheInfo:
    g = torch.Generator().manual_seed(seed)
    stats = {"lsh/planes": torch.randn(BITS, D, generator=g), "lsh/thresholds": torch.randn(BITS, generator=g)}
    return CacheInfo(num_classes=3, pooled_dim=D, available=available, target_shapes={LSH_CODES: (BITS // 8,)},
                     statistics=stats)


def reference_bce(z: np.ndarray, codes: np.ndarray) -> float:
    """Mean over batch and bits of -(y log s(z) + (1 - y) log(1 - s(z))), y unpacked LSB-first by numpy."""
    y = np.unpackbits(codes, axis=1, bitorder="little").astype(np.float64)
    p = 1 / (1 + np.exp(-z))
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def test_loss_is_beta_times_bce_against_the_unpacked_codes() -> None:
    cache = lsh_cache()
    method = create_method("elsh:beta=3", cache, StudentInfo(pooled_dim=4))
    assert isinstance(method.g, nn.Linear) and method.g.weight.shape == (D, 4)
    f_s = torch.randn(10, 4)
    codes = torch.from_numpy(np.random.default_rng(0).integers(0, 256, size=(10, BITS // 8), dtype=np.uint8))
    out = method(StudentOutputs(logits=torch.zeros(10, 3), pooled=f_s), {LSH_CODES: codes}, torch.zeros(10), PROGRESS)
    assert set(out) == {"elsh"}
    mapped = method.g(f_s).detach().double().numpy()
    z = mapped @ cache.statistics["lsh/planes"].double().numpy().T - cache.statistics["lsh/thresholds"].double().numpy()
    assert out["elsh"].item() == pytest.approx(3 * reference_bce(z, codes.numpy()), rel=1e-5)


def test_lshl2_adds_mse_to_the_teacher_feature_and_equal_widths_need_no_map() -> None:
    method = create_method("elsh:lshl2=0.5", lsh_cache(), StudentInfo(pooled_dim=D))
    assert method.needs == {LSH_CODES, POOLED} and create_method("elsh", lsh_cache(), StudentInfo(D)).needs == {LSH_CODES}
    assert isinstance(method.g, nn.Identity) and not list(method.parameters())
    f_s, f_t = torch.randn(7, D), torch.randn(7, D)
    codes = torch.zeros(7, BITS // 8, dtype=torch.uint8)
    out = method(StudentOutputs(logits=torch.zeros(7, 3), pooled=f_s), {LSH_CODES: codes, POOLED: f_t},
                 torch.zeros(7), PROGRESS)
    assert out["elsh_l2"].item() == pytest.approx(0.5 * float(((f_s - f_t) ** 2).mean()), rel=1e-6)
    assert out["elsh"].item() == pytest.approx(5 * reference_bce(method.bit_logits(f_s).double().numpy(),
                                                                 codes.numpy()), rel=1e-5)


def test_the_student_learns_the_teacher_codes() -> None:
    torch.manual_seed(0)
    cache = lsh_cache()
    f_t = torch.randn(64, D)
    bits = (f_t @ cache.statistics["lsh/planes"].T - cache.statistics["lsh/thresholds"] > 0).numpy()
    codes = torch.from_numpy(np.packbits(bits, axis=1, bitorder="little"))
    f_s = f_t @ torch.randn(D, 4)  # the student sees a 4-d projection of the 6-d teacher feature
    method = create_method("elsh", cache, StudentInfo(pooled_dim=4))
    optimiser = torch.optim.Adam(method.parameters(), lr=0.05)

    def loss() -> torch.Tensor:
        return method(StudentOutputs(logits=torch.zeros(64, 3), pooled=f_s), {LSH_CODES: codes},
                      torch.zeros(64), PROGRESS)["elsh"]

    first = loss().item()
    for _ in range(100):
        optimiser.zero_grad()
        loss().backward()
        optimiser.step()
    assert loss().item() < 0.5 * first


def test_missing_codes_or_planes_name_distillery_stats_and_lshl2_needs_pooled() -> None:
    no_codes = lsh_cache(available=frozenset({POOLED}))
    no_planes = CacheInfo(num_classes=3, pooled_dim=D, available=frozenset({LSH_CODES, POOLED}))
    for cache in (no_codes, no_planes):
        with pytest.raises(MethodError, match=r"`distillery stats CACHE --lsh-bits B`"):
            create_method("elsh", cache, StudentInfo(pooled_dim=4))
    codes_only = lsh_cache(available=frozenset({LSH_CODES}))
    create_method("elsh", codes_only, StudentInfo(pooled_dim=4))
    with pytest.raises(MethodError, match="lshl2 needs teacher pooled features"):
        create_method("elsh:lshl2=1", codes_only, StudentInfo(pooled_dim=4))
