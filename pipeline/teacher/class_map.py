"""`--class-map FILE`: the teacher classes that stand for each dataset class, so that logit methods can distill
a teacher whose head was trained on other classes (a 1000-class ImageNet teacher on a 10-class dataset).

The file is JSON (at most 1 MiB), one entry per dataset class, each with one or more teacher class indices:

    {"classes": {"T-shirt/top": [610, 841], "Trouser": [608], "Bag": [414, 728], ...}}

Every dataset class is named exactly once and no teacher class serves two dataset classes, so the groups are
disjoint. The mapped logit of a dataset class is the logsumexp of its teacher classes' logits: the log of the
group's summed unnormalised probability, i.e. the logit of "any of these classes". Softmax over the mapped
logits is then the teacher's probability of each group, renormalised over the groups (a KD temperature
softens these group logits, as it would a head trained on the groups). A group of one class is that
class's own logit, so KD over mapped logits is KD on the selected columns.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.bounded import MIB, read_json
from pipeline.checksums import sha256_bytes
from pipeline.errors import DistilleryError

CLASS_MAP_LIMIT = MIB  # 1000 classes with ten indices each is ~60 KiB
HINT = 'a class map is {"classes": {"DATASET CLASS": [TEACHER CLASS INDEX, ...], ...}}, every dataset class once'


class ClassMapError(DistilleryError):
    """A class map that does not fit the dataset or the teacher; the message says what to change."""


@dataclass(frozen=True)
class ClassMap:
    """Teacher class indices for each dataset class, in the dataset's label order."""

    classes: tuple[str, ...]  # the dataset's class names, label order
    teacher_indices: tuple[tuple[int, ...], ...]  # per dataset class: its teacher classes, as the file lists them
    teacher_classes: int  # width of the teacher's logits
    _index: Tensor = field(init=False, repr=False, compare=False)  # (C, K) teacher indices, padded with 0
    _valid: Tensor = field(init=False, repr=False, compare=False)  # (C, K) False where padded

    def __post_init__(self) -> None:
        width = max(len(group) for group in self.teacher_indices)
        index = torch.zeros(len(self.classes), width, dtype=torch.long)
        valid = torch.zeros(len(self.classes), width, dtype=torch.bool)
        for row, group in enumerate(self.teacher_indices):
            index[row, :len(group)] = torch.tensor(group)
            valid[row, :len(group)] = True
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_valid", valid)

    @classmethod
    def load(cls, path: str | Path, dataset_classes: Sequence[str], teacher_classes: int) -> ClassMap:
        """The class map in ``path`` for a dataset with ``dataset_classes`` (label order) and a teacher with
        ``teacher_classes`` logits; every problem one :class:`ClassMapError` line naming the file."""
        value = read_json(Path(path), CLASS_MAP_LIMIT, ClassMapError, HINT, unique_keys=True)
        return cls.parse(value, str(path), dataset_classes, teacher_classes)

    @classmethod
    def parse(cls, value: Any, where: str, dataset_classes: Sequence[str], teacher_classes: int) -> ClassMap:
        """A class map from its JSON value (a file's, or the copy a manifest records: `to_dict`)."""
        if not isinstance(value, dict) or set(value) != {"classes"} or not isinstance(value["classes"], dict):
            raise ClassMapError(f"{where} is not a class map; {HINT}")
        known = set(dataset_classes)
        groups: dict[str, tuple[int, ...]] = {}
        owner: dict[int, str] = {}
        for name, indices in value["classes"].items():
            if name not in known:
                shown = ", ".join(repr(c) for c in list(dataset_classes)[:12])
                more = ", ..." if len(dataset_classes) > 12 else ""
                raise ClassMapError(f"{where}: {name!r} is not a class of the dataset (its classes: {shown}{more})")
            if (not isinstance(indices, list) or not indices
                    or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices)):
                raise ClassMapError(f"{where}: {name!r} must list one or more teacher class indices (integers); "
                                    f"{HINT}")
            for i in indices:
                if not 0 <= i < teacher_classes:
                    raise ClassMapError(f"{where}: teacher class {i} (for {name!r}) is out of range: the teacher "
                                        f"has {teacher_classes} classes, 0 to {teacher_classes - 1}")
                if i in owner:
                    also = "twice for" if owner[i] == name else f"for both {owner[i]!r} and"
                    raise ClassMapError(f"{where}: teacher class {i} is listed {also} {name!r}; each teacher class "
                                        f"may stand for one dataset class only")
                owner[i] = name
            groups[name] = tuple(indices)
        missing = [c for c in dataset_classes if c not in groups]
        if missing:
            raise ClassMapError(f"{where}: dataset class{'es' if len(missing) > 1 else ''} "
                                f"{', '.join(repr(c) for c in missing[:12])}{', ...' if len(missing) > 12 else ''} "
                                f"{'have' if len(missing) > 1 else 'has'} no teacher classes; every dataset class "
                                f"needs at least one")
        return cls(classes=tuple(dataset_classes), teacher_indices=tuple(groups[c] for c in dataset_classes),
                   teacher_classes=teacher_classes)

    def to_dict(self) -> dict[str, Any]:
        """The map in the file's format (what a manifest records; `parse` reads it back)."""
        return {"classes": {name: list(group) for name, group in zip(self.classes, self.teacher_indices)}}

    @property
    def sha256(self) -> str:
        """Identity of the mapping itself (canonical JSON): the same for a file reformatted or reordered."""
        return sha256_bytes(json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode("utf-8"))

    def select(self, logits: Tensor) -> Tensor:
        """Mapped logits ``(..., C)`` from teacher logits ``(..., teacher_classes)``: per dataset class, the
        logsumexp of its teacher classes' logits (float32 at least, as every loss computes)."""
        if logits.shape[-1] != self.teacher_classes:
            raise ClassMapError(f"the teacher gives {logits.shape[-1]} logits, the class map is for "
                                f"{self.teacher_classes}; map the teacher that made the logits")
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        grouped = x[..., self._index.to(x.device)]  # (..., C, K)
        grouped = grouped.masked_fill(~self._valid.to(x.device), float("-inf"))
        return torch.logsumexp(grouped, dim=-1)
