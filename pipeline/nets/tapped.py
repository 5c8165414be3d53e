"""timm models and their taps: logits, pooled pre-logits and stage feature maps from one trunk pass.

The teacher (`pipeline.teacher.model.Teacher`) and the student (`pipeline.train.student.Student`) are both a
timm model read through :func:`tapped_forward` (timm's own separation: `forward_intermediates` for the stage
maps, `forward_head(pre_logits=True)` for the pooled features, then the classifier), so a stage name, a
pooled feature or a map means the same on both sides (docs/ARCHITECTURE.md#layers, docs/methods.md#compose).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.errors import DistilleryError, did_you_mean


class ModelError(DistilleryError):
    """A timm model that cannot be built, tapped or cut as asked; the message says what to do."""


@dataclass
class TappedOutputs:
    """One batch through a tapped model."""

    logits: torch.Tensor | None  # (B, C); None for a head-less model
    pooled: torch.Tensor  # (B, D) pre-logits after global pooling
    maps: dict[str, torch.Tensor]  # tapped stage name -> (B, Cf, H, W)


def check_timm_name(name: str) -> None:
    """One line naming the closest known models when timm has no model `name`."""
    # timm imports torchvision and torch._dynamo (seconds): only a process that builds or checks a model pays
    # for it, not the CLI listing its options or a DataLoader worker.
    import timm

    if not timm.is_model(name):
        raise ModelError(f"unknown timm model '{name}'{did_you_mean(name, timm.list_models())}; see "
                         f"timm.list_models()")


def create_timm_model(name: str, num_classes: int, in_chans: int, input_size: int, **kwargs: Any) -> nn.Module:
    """`timm.create_model` with one-line errors; ViT-like models get `img_size` so small inputs work."""
    import timm

    check_timm_name(name)
    kwargs = dict(kwargs)
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                 img_size=input_size, **kwargs)
    except TypeError:
        pass
    # Convnets take no img_size; only ViT-style models need it to size their position embeddings.
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError:
        if not kwargs:
            raise
        given = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        raise ModelError(f"timm model '{name}' does not take {given}; leave it out (e.g. --patch-size is for "
                         f"ViT-style models)") from None


def stage_names(model: nn.Module) -> list[str]:
    """Names of the model's feature stages (timm `feature_info` modules), shallow to deep."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise ModelError(f"{type(model).__name__} exposes no timm feature_info; it cannot be tapped")
    return [fi["module"] for fi in info]


def resolve_tap(model: nn.Module, tap: str | int) -> str:
    """A stage given by name (`layer4`) or index (`-1` = deepest) -> its feature_info module name."""
    names = stage_names(model)
    if isinstance(tap, int) or str(tap).lstrip("-").isdigit():
        idx = int(tap)
        if not -len(names) <= idx < len(names):
            raise ModelError(f"tap index {idx} out of range; stages are {names}")
        return names[idx]
    if tap not in names:
        raise ModelError(f"unknown tap '{tap}'; stages of this model are {names}")
    return str(tap)


def tap_indices(model: nn.Module, taps: tuple[str, ...]) -> list[int]:
    """Positions of the named stages among the model's stages (what `forward_intermediates` takes)."""
    names = stage_names(model)
    return [names.index(t) for t in taps]


def tapped_forward(model: nn.Module, x: torch.Tensor, taps: tuple[str, ...], indices: list[int],
                   head: bool = True) -> TappedOutputs:
    """Logits (unless `head` is False), pooled pre-logits and the maps of stages `taps` (at `indices`, from
    :func:`tap_indices`) in one trunk pass."""
    maps: dict[str, torch.Tensor] = {}
    if indices:
        final, inter = model.forward_intermediates(x, indices=indices)
        maps = dict(zip(taps, inter))
    else:
        final = model.forward_features(x)
    pooled = model.forward_head(final, pre_logits=True)
    if not head:
        return TappedOutputs(logits=None, pooled=pooled, maps=maps)
    classifier = model.get_classifier()
    # A distilled DeiT has two heads (class and distillation token) whose logits timm averages, and a pooled
    # feature that averages the two tokens: only its own forward_head gives its logits.
    logits = classifier(pooled) if isinstance(classifier, nn.Module) else model.forward_head(final)
    return TappedOutputs(logits=logits, pooled=pooled, maps=maps)
