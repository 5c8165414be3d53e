"""Accuracy on a labelled split from the clean view (labels only; no teacher involved)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.data.datasets import ImageDataset
from pipeline.data.rendering import clean_views


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, dataset: ImageDataset, size: int, mean: Sequence[float],
                      std: Sequence[float], batch_size: int = 512, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy (0..1) of `model` on view 0 of every sample of `dataset`."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(clean_views(dataset, size, mean, std), batch_size=batch_size)
    correct = 0
    for x, y in loader:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
            logits = model(x.to(device))
        correct += (logits.argmax(1).cpu() == y).sum().item()
    model.train(was_training)
    return correct / len(dataset)
