import pytest
import torch

from pipeline.methods import LOGITS, CacheInfo, StudentInfo, StudentOutputs, TrainingProgress, create_method
from pipeline.methods.dkd import dkd_loss, dkd_terms, drop_target
from pipeline.methods.kd import kd_loss

CACHE = CacheInfo(num_classes=9, pooled_dim=None, available=frozenset({LOGITS}))


def random_batch(B=8, C=9, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z_s = torch.randn(B, C, generator=g, dtype=torch.float64) * scale
    z_t = torch.randn(B, C, generator=g, dtype=torch.float64) * scale
    return z_s, z_t, torch.randint(0, C, (B,), generator=g)


def test_drop_target_drops_the_label_column():
    z = torch.arange(12.0).view(3, 4)
    out = drop_target(z, torch.tensor([0, 2, 3]))
    assert out.tolist() == [[1, 2, 3], [4, 5, 7], [8, 9, 10]]


def test_decomposition_identity():
    # Per sample, KL(p_t || p_s) = TCKD + (1 - p_t[y]) * NCKD at T = 1 (Zhao et al., Eq. 7).
    z_s, z_t, y = random_batch()
    for i in range(len(y)):
        s, t, label = z_s[i : i + 1], z_t[i : i + 1], y[i : i + 1]
        tckd, nckd = dkd_terms(s, t, label, 1.0)
        p_t_target = torch.softmax(t, 1)[0, label].item()
        torch.testing.assert_close(kd_loss(s, t, 1.0), tckd + (1 - p_t_target) * nckd, rtol=1e-9, atol=1e-12)


def test_dkd_loss_weights_its_terms():
    z_s, z_t, y = random_batch()
    tckd, nckd = dkd_terms(z_s, z_t, y, 4.0)
    torch.testing.assert_close(dkd_loss(z_s, z_t, y, 2.0, 0.5, 4.0), 2.0 * tckd + 0.5 * nckd)


def test_equal_logits_give_zero():
    z_s, _, y = random_batch()
    assert dkd_loss(z_s, z_s.clone(), y, 1.0, 8.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("epoch", "step", "ramp"), [(0, 0, 0.0), (5, 0, 0.25), (10, 5, 0.525), (20, 0, 1.0), (35, 3, 1.0)]
)
def test_warmup_scaling(epoch, step, ramp):
    z_s, z_t, y = random_batch()
    method = create_method("dkd:alpha=1.5,beta=8,T=4,warmup=20", CACHE, StudentInfo(pooled_dim=4))
    progress = TrainingProgress(epoch=epoch, step=step, steps_per_epoch=10, total_epochs=40)
    out = method(StudentOutputs(logits=z_s, pooled=torch.zeros(len(y), 4)), {LOGITS: z_t}, y, progress)
    tckd, nckd = dkd_terms(z_s, z_t, y, 4.0)
    torch.testing.assert_close(out["dkd_tckd"], ramp * 1.5 * tckd)
    torch.testing.assert_close(out["dkd_nckd"], ramp * 8.0 * nckd)


def test_finite_for_near_one_hot_teacher():
    z_s = torch.randn(4, 9, requires_grad=True)
    y = torch.tensor([0, 3, 5, 8])
    z_t = torch.full((4, 9), -200.0)
    z_t[torch.arange(4), y] = 200.0  # p_t[y] == 1 and non-target mass 0 in float32
    for T in (1.0, 4.0):
        tckd, nckd = dkd_terms(z_s, z_t, y, T)
        loss = tckd + 8.0 * nckd
        (grad,) = torch.autograd.grad(loss, z_s)
        assert torch.isfinite(tckd) and torch.isfinite(nckd) and torch.isfinite(grad).all()
    # The student matching the confident teacher also stays finite (log(1 - p_s[y]) with p_s[y] -> 1).
    z_s_confident = z_t.clone().requires_grad_(True)
    loss = dkd_loss(z_s_confident, z_t, y, 1.0, 8.0, 1.0)
    (grad,) = torch.autograd.grad(loss, z_s_confident)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
