import numpy as np
import pytest
import torch

from pipeline.methods import LOGITS, CacheInfo, StudentInfo, StudentOutputs, TrainingProgress, create_method
from pipeline.methods.kd import kd_loss

CACHE = CacheInfo(num_classes=7, pooled_dim=None, available=frozenset({LOGITS}))
PROGRESS = TrainingProgress(epoch=0, step=0, steps_per_epoch=1, total_epochs=1)


def np_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_matches_direct_computation(T):
    rng = np.random.default_rng(0)
    z_s, z_t = rng.normal(size=(5, 7)) * 3, rng.normal(size=(5, 7)) * 3
    p_s, p_t = np_softmax(z_s / T), np_softmax(z_t / T)
    expected = T**2 * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1))
    got = kd_loss(torch.tensor(z_s), torch.tensor(z_t), T)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kd_zero_for_equal_logits():
    z = torch.randn(4, 7)
    assert kd_loss(z, z.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_gradient_closed_form():
    torch.manual_seed(0)
    T, alpha, B = 3.0, 0.7, 6
    z_s = torch.randn(B, 7, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(B, 7, dtype=torch.float64)
    method = create_method(f"kd:T={T},alpha={alpha}", CACHE, StudentInfo(pooled_dim=4))
    student = StudentOutputs(logits=z_s, pooled=torch.zeros(B, 4))
    out = method(student, {LOGITS: z_t}, torch.zeros(B), PROGRESS)
    out["kd"].backward()
    expected = alpha * T * (torch.softmax(z_s / T, 1) - torch.softmax(z_t / T, 1)) / B
    torch.testing.assert_close(z_s.grad, expected.detach(), rtol=1e-9, atol=1e-12)


def test_kd_finite_for_one_hot_teacher():
    z_s = torch.randn(3, 7, requires_grad=True)
    z_t = torch.full((3, 7), -1e4)
    z_t[:, 0] = 1e4
    loss = kd_loss(z_s, z_t, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z_s.grad).all()


def test_kd_low_precision_logits_computed_in_float32():
    z_s, z_t = torch.randn(4, 7).bfloat16(), torch.randn(4, 7).half()
    loss = kd_loss(z_s, z_t, 4.0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, kd_loss(z_s.float(), z_t.float(), 4.0))
