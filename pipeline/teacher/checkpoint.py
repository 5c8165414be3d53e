"""The teacher checkpoint: what `distillery fit-teacher` writes and every reader of a teacher file loads.

On disk it is a plain dict of tensors and JSON-like values under fixed keys (the ``distillery-teacher/1``
format every `fit-teacher` has written; a checkpoint fitted before ``train_fingerprint`` was recorded lacks
that key, and only a fit from pretrained weights has ``start_weights`` and ``start_weights_sha256``). A
checkpoint is a file someone may hand you, so it is read like a cache (docs/cache-format.md#security):
a regular file under `MAX_CHECKPOINT_BYTES`, through ``torch.load(weights_only=True)`` (tensors and plain
values, no pickled code), every key and type checked once here; any problem is one :class:`CheckpointError`
line. Readers then use typed attributes, not dict lookups.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import atomic_write
from pipeline.bounded import open_regular
from pipeline.errors import DistilleryError

CHECKPOINT_FORMAT = "distillery-teacher/1"

MAX_CHECKPOINT_BYTES = 16 << 30
"""Largest checkpoint read: four times a ViT-g's float32 weights; a larger (or sparse) file is refused from its
size, before anything is read."""

NOT_A_CHECKPOINT = "expected a `distillery fit-teacher` checkpoint"


class CheckpointError(DistilleryError):
    """A teacher checkpoint that cannot be read or is not a `distillery fit-teacher` checkpoint."""


@dataclass(frozen=True)
class TeacherCheckpoint:
    """A fitted teacher: its weights and what a cache needs to rebuild its inputs exactly."""

    model: str  # the timm name
    state_dict: dict[str, torch.Tensor]
    num_classes: int
    in_chans: int
    input_size: int
    mean: tuple[float, ...]  # the normalisation it was fitted with, one value per channel
    std: tuple[float, ...]
    dataset: str  # the name of the dataset it was fitted on
    val_accuracy: float | None  # None for an ssl teacher: its classifier was never trained
    config: dict[str, Any]  # the `FitConfig` it was fitted with, as a dict (older fits lack newer settings)
    # The fingerprint of the full train split (ids, labels, class names) that `distillery cache` compares with
    # the dataset it caches (`pipeline.preflight.checkpoint_dataset`); None: fitted before it was recorded.
    train_fingerprint: str | None = None
    # The pretrained weights the fit started from (`fit-teacher --weights`, as given) and their file's sha256;
    # None for a fit from random weights. Written only when set: other checkpoints keep the format's keys.
    start_weights: str | None = None
    start_weights_sha256: str | None = None

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """The `timm.create_model` arguments beyond the name that rebuild its architecture (`fit-teacher
        --patch-size`; none for a checkpoint fitted before the option existed)."""
        patch_size = self.config.get("patch_size")
        return {"patch_size": patch_size} if patch_size else {}

    def to_dict(self) -> dict[str, Any]:
        """The on-disk dict (the format's keys; lists for the tuples)."""
        start = {k: getattr(self, k) for k in _STARTED_FROM if getattr(self, k) is not None}
        return {"format": CHECKPOINT_FORMAT, "model": self.model, "state_dict": self.state_dict,
                "num_classes": self.num_classes, "in_chans": self.in_chans, "input_size": self.input_size,
                "mean": list(self.mean), "std": list(self.std), "dataset": self.dataset,
                "val_accuracy": self.val_accuracy, "train_fingerprint": self.train_fingerprint,
                "config": self.config, **start}

    def save(self, path: str | Path) -> None:
        """Write the checkpoint atomically (a reader sees the old file or the new one)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(self.to_dict(), f))

    @classmethod
    def load(cls, path: str | Path) -> TeacherCheckpoint:
        """Read and check the checkpoint at ``path``; every problem is one `CheckpointError` line."""
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist; train one with `distillery fit-teacher ... "
                                  f"--out {path}`")
        with open_regular(path, MAX_CHECKPOINT_BYTES, CheckpointError, NOT_A_CHECKPOINT) as f:
            try:
                raw = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - whatever torch.load makes of a bad file, the same one line
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise CheckpointError(f"checkpoint {path} is not a readable torch checkpoint "
                                      f"({type(e).__name__}: {first}); {NOT_A_CHECKPOINT}") from None
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> TeacherCheckpoint:
        """The checkpoint held by ``raw`` (what ``torch.load`` returned from ``where``), every key and type checked."""
        def refuse(what: str) -> CheckpointError:
            return CheckpointError(f"checkpoint {where} {what}; {NOT_A_CHECKPOINT}")

        if not isinstance(raw, dict):
            raise refuse(f"holds a {type(raw).__name__}, not a dict")
        fields = {"train_fingerprint": None, **dict.fromkeys(_STARTED_FROM), **raw}
        if fields.pop("format", None) != CHECKPOINT_FORMAT:
            raise refuse(f"is not in the {CHECKPOINT_FORMAT} format")
        missing = [key for key in _KINDS if key not in fields]
        if missing:
            raise refuse(f"lacks {', '.join(missing)}")
        unknown = [repr(str(key)[:40]) for key in fields if key not in _KINDS]
        if unknown:
            raise refuse(f"has keys the {CHECKPOINT_FORMAT} format does not have ({', '.join(unknown[:5])})")
        for key, kinds in _KINDS.items():
            if not isinstance(fields[key], kinds) or isinstance(fields[key], bool):
                raise refuse(f"has a {type(fields[key]).__name__} as {key}")
        for key in ("num_classes", "in_chans", "input_size"):
            if fields[key] < 1:
                raise refuse(f"has {key} {fields[key]}, not a positive count")
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in fields["state_dict"].items()):
            raise refuse("has a state_dict that is not names to tensors")
        for key in ("mean", "std"):
            if len(fields[key]) != fields["in_chans"] or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in fields[key]):
                raise refuse(f"has a {key} that is not {fields['in_chans']} numbers (one per input channel)")
            fields[key] = tuple(float(v) for v in fields[key])
        return cls(**fields)


_KINDS: dict[str, tuple[type, ...]] = {
    "model": (str,), "state_dict": (dict,), "num_classes": (int,), "in_chans": (int,), "input_size": (int,),
    "mean": (list, tuple), "std": (list, tuple), "dataset": (str,), "val_accuracy": (float, type(None)),
    "config": (dict,), "train_fingerprint": (str, type(None)), "start_weights": (str, type(None)),
    "start_weights_sha256": (str, type(None))}
"""Every key of the on-disk dict but ``format``, and the types its value may have."""
_STARTED_FROM = ("start_weights", "start_weights_sha256")  # optional keys, on disk only when set
