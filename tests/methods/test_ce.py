import torch
import torch.nn.functional as F

from pipeline.methods import CacheInfo, StudentInfo, StudentOutputs, TrainingProgress, create_method

NO_TARGETS = CacheInfo(num_classes=5, pooled_dim=None, available=frozenset())
PROGRESS = TrainingProgress(epoch=0, step=0, steps_per_epoch=1, total_epochs=1)


def test_ce_needs_nothing_and_matches_torch():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 5), torch.randint(0, 5, (6,))
    student = StudentOutputs(logits=logits, pooled=torch.randn(6, 3))
    out = create_method("ce:label_smoothing=0.1,weight=0.5", NO_TARGETS, StudentInfo(pooled_dim=3))(student, {}, labels, PROGRESS)
    assert out.keys() == {"ce"}
    expected = 0.5 * F.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(out["ce"], expected)
