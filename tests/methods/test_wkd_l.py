import math

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from pipeline.methods import (
    LOGITS,
    CacheInfo,
    MethodError,
    StudentInfo,
    StudentOutputs,
    TrainingProgress,
    create_method,
)
from pipeline.methods.dkd import drop_target
from pipeline.methods.wkd_l import (
    interrelation_cost,
    non_target_probs,
    sinkhorn_distance,
    target_term,
    wkd_l_distance,
)

STUDENT = StudentInfo(pooled_dim=4)
START = TrainingProgress(epoch=0, step=0, steps_per_epoch=10, total_epochs=4)


def random_ir(c: int, seed: int = 0) -> torch.Tensor:
    """A valid interrelation matrix: linear CKA between random class blocks would be costly, but any
    symmetric matrix in [0, 1] with a unit diagonal is what the cost formula accepts."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(c, c, generator=g)
    ir = (a + a.T) / 2
    ir.fill_diagonal_(1.0)
    return ir


def cache_with_ir(c: int, seed: int = 0) -> CacheInfo:
    return CacheInfo(num_classes=c, pooled_dim=None, available=frozenset({LOGITS}),
                     statistics={"cka/ir": random_ir(c, seed)})


def random_logits(b: int, c: int, scale: float = 3.0, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z_s = torch.randn(b, c, generator=g, dtype=dtype) * scale
    z_t = torch.randn(b, c, generator=g, dtype=dtype) * scale
    return z_s, z_t, torch.randint(0, c, (b,), generator=g)


def reference_plan_distance(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, reg: float, iters: int) -> float:
    """docs/methods.md#wkd-l literally, for one pair: explicit plan diag(u) K diag(v), then sum(plan * cost)."""
    kernel = torch.exp(-cost / reg)
    u = torch.full_like(a, 1.0 / a.numel())
    for _ in range(iters):
        v = b / (kernel.T @ u + 1e-8)
        u = a / (kernel @ v + 1e-8)
    plan = u[:, None] * kernel * v[None, :]
    return float((plan * cost).sum())


def test_cost_formula():
    ir = torch.tensor([[1.0, 0.25], [0.25, 1.0]])
    cost = interrelation_cost(ir, kappa=2.0)
    assert cost[0, 0] == pytest.approx(1e-8, rel=1e-3)
    assert cost[0, 1] == pytest.approx(1 - math.exp(-2 * 0.75) + 1e-8, rel=1e-6)
    # IR slightly above 1 (float rounding) is clipped by the relu, never a negative cost
    assert interrelation_cost(torch.tensor([[1.0 + 1e-6]]), 1.0).item() == pytest.approx(1e-8, rel=1e-3)


@pytest.mark.parametrize("reg", [0.05, 0.2])
def test_sinkhorn_distance_matches_pot_when_converged(reg):
    c, b = 12, 5
    g = torch.Generator().manual_seed(1)
    p_s = torch.softmax(torch.randn(b, c, generator=g, dtype=torch.float64) * 2, -1)
    p_t = torch.softmax(torch.randn(b, c, generator=g, dtype=torch.float64) * 2, -1)
    cost = interrelation_cost(random_ir(c, seed=2), kappa=1.0).double()

    ours = sinkhorn_distance(p_s, p_t, cost, reg, iters=3000)

    # POT uses the same kernel K = exp(-M / reg) and returns <plan, M> without the entropy term.
    expected = [ot.sinkhorn2(p_s[i].numpy(), p_t[i].numpy(), cost.numpy(), reg, numItermax=100_000, stopThr=1e-13)
                for i in range(b)]
    np.testing.assert_allclose(ours.numpy(), np.array(expected), atol=1e-4, rtol=0)


def test_sinkhorn_distance_matches_explicit_plan_at_ten_iterations():
    c, b = 9, 4
    g = torch.Generator().manual_seed(3)
    p_s = torch.softmax(torch.randn(b, c, generator=g, dtype=torch.float64), -1)
    p_t = torch.softmax(torch.randn(b, c, generator=g, dtype=torch.float64), -1)
    cost = interrelation_cost(random_ir(c, seed=4), kappa=1.0).double()
    ours = sinkhorn_distance(p_s, p_t, cost, 0.05, iters=10)
    expected = [reference_plan_distance(p_s[i], p_t[i], cost, 0.05, 10) for i in range(b)]
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_target_removal_equals_reduced_problem_per_sample(temperature):
    b, c = 6, 9
    z_s, z_t, y = random_logits(b, c, seed=5)
    cost = interrelation_cost(random_ir(c, seed=6), kappa=1.0).double()
    p_s, p_t = non_target_probs(z_s, y, temperature), non_target_probs(z_t, y, temperature)
    ours = sinkhorn_distance(p_s, p_t, cost, 0.05, 10, support=~F.one_hot(y, c).bool())

    for i in range(b):
        keep = torch.arange(c) != y[i]
        a = torch.softmax(drop_target(z_s[i : i + 1], y[i : i + 1])[0] / temperature, -1)
        bb = torch.softmax(drop_target(z_t[i : i + 1], y[i : i + 1])[0] / temperature, -1)
        reduced = cost[keep][:, keep]
        assert ours[i].item() == pytest.approx(reference_plan_distance(a, bb, reduced, 0.05, 10), rel=1e-9)
    assert wkd_l_distance(z_s, z_t, y, cost, temperature, 0.05, 10).item() == pytest.approx(ours.mean().item())


def test_non_target_probs_put_zero_mass_on_the_label():
    z_s, _, y = random_logits(5, 7)
    p = non_target_probs(z_s, y, 2.0)
    assert (p.gather(1, y[:, None]) == 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(5, dtype=p.dtype))


def test_target_term_matches_definition_and_does_not_train_the_teacher():
    z_s, z_t, y = random_logits(6, 5)
    z_s.requires_grad_(True)
    z_t.requires_grad_(True)
    loss = target_term(z_s, z_t, y)
    p_t, p_s = torch.softmax(z_t.detach(), -1), torch.softmax(z_s.detach(), -1)
    expected = -np.mean([p_t[i, y[i]].item() * math.log(p_s[i, y[i]].item()) for i in range(6)])
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert z_t.grad is None and torch.isfinite(z_s.grad).all()


def test_method_terms_and_options():
    cache = cache_with_ir(8)
    method = create_method("wkd_l:T=3,weight=5,kappa=2,sinkhorn_reg=0.1,sinkhorn_iters=7", cache, STUDENT)
    z_s, z_t, y = random_logits(6, 8, seed=9)
    out = method(StudentOutputs(logits=z_s, pooled=torch.zeros(6, 4)), {LOGITS: z_t}, y, START)
    cost = interrelation_cost(cache.statistics["cka/ir"], 2.0)
    assert set(out) == {"wkd_l_target", "wkd_l_wd"}
    torch.testing.assert_close(out["wkd_l_target"], target_term(z_s, z_t, y))
    torch.testing.assert_close(out["wkd_l_wd"], 5 * wkd_l_distance(z_s, z_t, y, cost, 3.0, 0.1, 7))


def test_weight_follows_the_cosine_decay():
    method = create_method("wkd_l:decay_start=1", cache_with_ir(6), STUDENT)
    z_s, z_t, y = random_logits(4, 6, seed=2)
    batch = StudentOutputs(logits=z_s, pooled=torch.zeros(4, 4))
    before = method(batch, {LOGITS: z_t}, y, START)["wkd_l_wd"]
    halfway = TrainingProgress(epoch=2, step=5, steps_per_epoch=10, total_epochs=4)  # 2.5 = E0 + (4 - E0) / 2
    after = method(batch, {LOGITS: z_t}, y, halfway)["wkd_l_wd"]
    assert after.item() == pytest.approx(0.5 * before.item(), rel=1e-9)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
@pytest.mark.parametrize("kappa", [1.0, 4.0])
def test_gradients_finite_for_near_one_hot_distributions(temperature, kappa):
    c = 10
    method = create_method(f"wkd_l:T={temperature},kappa={kappa}", cache_with_ir(c), STUDENT)
    y = torch.tensor([0, 3, 5, 9])
    # Teacher one-hot on the label, one-hot on a non-target class, and a student that is just as sure.
    z_t = torch.full((4, c), -60.0)
    z_t[0, 0] = z_t[1, 3] = 60.0
    z_t[2, 7] = z_t[3, 1] = 80.0
    z_s = (torch.randn(4, c) * 40).requires_grad_(True)
    out = method(StudentOutputs(logits=z_s, pooled=torch.zeros(4, 4)), {LOGITS: z_t}, y, START)
    loss = sum(out.values())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z_s.grad).all()


def test_runs_in_float32_under_autocast():
    method = create_method("wkd_l", cache_with_ir(7), STUDENT)
    z_s, z_t, y = random_logits(5, 7, dtype=torch.float32)
    batch = StudentOutputs(logits=z_s, pooled=torch.zeros(5, 4))
    plain = method(batch, {LOGITS: z_t}, y, START)["wkd_l_wd"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = method(batch, {LOGITS: z_t}, y, START)["wkd_l_wd"]
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain)


def test_thousand_classes_never_save_a_batch_of_cost_matrices():
    b, c = 256, 1000
    method = create_method("wkd_l", cache_with_ir(c), STUDENT)
    z_s, z_t, y = random_logits(b, c, dtype=torch.float32)
    z_s.requires_grad_(True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = method(StudentOutputs(logits=z_s, pooled=torch.zeros(b, 4)), {LOGITS: z_t}, y, START)
    sum(out.values()).backward()
    assert saved and max(saved) <= max(b * c, c * c) < b * c * c
    assert torch.isfinite(z_s.grad).all()


def test_missing_interrelations_say_how_to_compute_them():
    cache = CacheInfo(num_classes=5, pooled_dim=None, available=frozenset({LOGITS}), root="/data/cache")
    with pytest.raises(MethodError, match=r"stats/cka/ir.*`distillery stats /data/cache`") as info:
        create_method("wkd_l", cache, STUDENT)
    assert "\n" not in str(info.value)


def test_wrong_shaped_interrelations_and_bad_options_are_refused():
    wrong = CacheInfo(num_classes=5, pooled_dim=None, available=frozenset({LOGITS}),
                      statistics={"cka/ir": random_ir(4)})
    with pytest.raises(MethodError, match=r"\(4, 4\).*\(5, 5\)"):
        create_method("wkd_l", wrong, STUDENT)
    for bad in ("T=0", "sinkhorn_reg=0", "sinkhorn_iters=0", "decay_start=-1"):
        with pytest.raises(MethodError, match="wkd_l"):
            create_method(f"wkd_l:{bad}", cache_with_ir(5), STUDENT)
