"""`--class-map`: dataset classes mapped to teacher classes; KD over mapped logits is KD on the selected columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.data.datasets import FASHION_MNIST_CLASSES
from pipeline.methods.kd import kd_loss
from pipeline.teacher.class_map import ClassMap, ClassMapError

CLASSES = list(FASHION_MNIST_CLASSES)
TEACHER = 1000
# One ImageNet-like column per class, except two classes that stand for groups of teacher classes.
GROUPS = {name: [100 + 7 * i] for i, name in enumerate(CLASSES)} | {CLASSES[0]: [610, 841], CLASSES[8]: [414, 728, 3]}


def write(tmp_path: Path, value, name: str = "map.json") -> Path:
    path = tmp_path / name
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return path


def test_load_orders_the_groups_by_dataset_label_and_select_takes_their_logsumexp(tmp_path: Path) -> None:
    shuffled = dict(reversed(list(GROUPS.items())))  # the file's order does not matter
    cmap = ClassMap.load(write(tmp_path, {"classes": shuffled}), CLASSES, TEACHER)
    assert cmap.classes == tuple(CLASSES) and cmap.teacher_indices[0] == (610, 841)
    logits = torch.randn(5, 3, TEACHER).half()  # e.g. (batch, views, classes) as a cache stores them
    mapped = cmap.select(logits)
    assert mapped.shape == (5, 3, len(CLASSES)) and mapped.dtype == torch.float32
    x = logits.float()
    for c, group in enumerate(cmap.teacher_indices):
        torch.testing.assert_close(mapped[..., c], torch.log(torch.exp(x[..., list(group)]).sum(-1)))
    # What a manifest records reads back to the same map; the identity ignores the file's order and layout.
    again = ClassMap.parse(json.loads(json.dumps(cmap.to_dict())), "manifest", CLASSES, TEACHER)
    assert again == cmap and again.sha256 == ClassMap.load(write(tmp_path, {"classes": GROUPS}, "b.json"),
                                                           CLASSES, TEACHER).sha256


def kd_by_hand(student: torch.Tensor, teacher_columns: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * KL(p_t || p_s), batch mean, written out: p = exp(z/T) / sum exp(z/T)."""
    p_t = torch.exp(teacher_columns / T) / torch.exp(teacher_columns / T).sum(-1, keepdim=True)
    log_p_s = student / T - torch.log(torch.exp(student / T).sum(-1, keepdim=True))
    return T**2 * (p_t * (torch.log(p_t) - log_p_s)).sum(-1).mean()


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_over_mapped_logits_equals_kd_by_hand_on_the_selected_columns(tmp_path: Path, T: float) -> None:
    torch.manual_seed(0)
    teacher = torch.randn(16, TEACHER, dtype=torch.float64) * 3
    student = torch.randn(16, len(CLASSES), dtype=torch.float64)
    # One teacher class per dataset class: the mapped logits are exactly the selected columns.
    columns = [100 + 7 * i for i in range(len(CLASSES))]
    single = ClassMap.load(write(tmp_path, {"classes": dict(zip(CLASSES, ([c] for c in columns)))}), CLASSES, TEACHER)
    torch.testing.assert_close(kd_loss(student, single.select(teacher), T), kd_by_hand(student, teacher[:, columns], T))
    # Groups: the column of a group is the log of its summed exp-logits.
    grouped = ClassMap.load(write(tmp_path, {"classes": GROUPS}, "groups.json"), CLASSES, TEACHER)
    by_hand = torch.stack([torch.log(torch.exp(teacher[:, GROUPS[c]]).sum(-1)) for c in CLASSES], dim=1)
    torch.testing.assert_close(kd_loss(student, grouped.select(teacher), T), kd_by_hand(student, by_hand, T))


@pytest.mark.parametrize("content, message", [
    ('{"classes": {"Trouser": [1], "Trouser": [2]}}', 'names "Trouser" twice in one object'),
    ({"classes": GROUPS | {"Trouser": [1000]}}, "teacher class 1000 (for 'Trouser') is out of range: the teacher has "
                                                "1000 classes, 0 to 999"),
    ({"classes": GROUPS | {"Trouser": [-1]}}, "teacher class -1 (for 'Trouser') is out of range"),
    ({"classes": GROUPS | {"Trousers": [5]}}, "'Trousers' is not a class of the dataset (its classes: 'T-shirt/top'"),
    ({"classes": {c: g for c, g in GROUPS.items() if c not in ("Bag", "Sandal")}},
     "dataset classes 'Sandal', 'Bag' have no teacher classes"),
    ({"classes": GROUPS | {"Trouser": [610]}}, "teacher class 610 is listed for both 'T-shirt/top' and 'Trouser'"),
    ({"classes": GROUPS | {"Trouser": [5, 5]}}, "teacher class 5 is listed twice for 'Trouser'"),
    ({"classes": GROUPS | {"Trouser": []}}, "'Trouser' must list one or more teacher class indices"),
    ({"classes": GROUPS | {"Trouser": [1.5]}}, "'Trouser' must list one or more teacher class indices"),
    ({"classes": GROUPS | {"Trouser": [True]}}, "'Trouser' must list one or more teacher class indices"),
    ({"classes": GROUPS | {"Trouser": 5}}, "'Trouser' must list one or more teacher class indices"),
    ({"classes": GROUPS, "teacher": "resnet50"}, "is not a class map"),
    ([1, 2], "is not a class map"),
    ("{not json", "is not valid JSON"),
    ("x" * (1 << 20 | 1), "more than the 1 MiB such a file can be"),
])
def test_bad_class_maps_are_one_line(tmp_path: Path, content, message: str) -> None:
    with pytest.raises(ClassMapError) as e:
        ClassMap.load(write(tmp_path, content), CLASSES, TEACHER)
    line = str(e.value)
    assert message in line and "\n" not in line and str(tmp_path / "map.json") in line, line


def test_a_missing_file_and_logits_of_another_teacher_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ClassMapError, match="cannot read .*absent.json"):
        ClassMap.load(tmp_path / "absent.json", CLASSES, TEACHER)
    cmap = ClassMap.load(write(tmp_path, {"classes": GROUPS}), CLASSES, TEACHER)
    with pytest.raises(ClassMapError, match="the teacher gives 10 logits, the class map is for 1000"):
        cmap.select(torch.zeros(2, 10))
