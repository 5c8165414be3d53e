import torch

from pipeline.methods import POOLED, CacheInfo, StudentInfo, StudentOutputs, TrainingProgress, create_method

CACHE = CacheInfo(num_classes=3, pooled_dim=12, available=frozenset({POOLED}))
PROGRESS = TrainingProgress(epoch=0, step=0, steps_per_epoch=1, total_epochs=1)


def test_fitnet_map_shape_and_weight():
    method = create_method("fitnet:weight=2", CACHE, StudentInfo(pooled_dim=5))
    assert method.map.in_features == 5 and method.map.out_features == 12
    f_s, f_t = torch.randn(4, 5), torch.randn(4, 12)
    student = StudentOutputs(logits=torch.zeros(4, 3), pooled=f_s)
    out = method(student, {POOLED: f_t}, torch.zeros(4), PROGRESS)
    expected = 2.0 * ((method.map(f_s) - f_t) ** 2).mean()
    torch.testing.assert_close(out["fitnet"], expected)


def test_fitnet_learns():
    torch.manual_seed(0)
    f_s = torch.randn(32, 5)
    f_t = f_s @ torch.randn(5, 12) + 0.5  # reachable by a linear map
    method = create_method("fitnet", CACHE, StudentInfo(pooled_dim=5))
    optimiser = torch.optim.SGD(method.parameters(), lr=0.1)
    student = StudentOutputs(logits=torch.zeros(32, 3), pooled=f_s)

    def loss():
        return method(student, {POOLED: f_t}, torch.zeros(32), PROGRESS)["fitnet"]

    first = loss().item()
    for _ in range(50):
        optimiser.zero_grad()
        loss().backward()
        optimiser.step()
    assert loss().item() < 0.2 * first
