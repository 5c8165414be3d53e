"""Cosine 1-NN accuracy of a teacher checkpoint's pooled view-0 features: val images against train images.

A label-free way to compare teachers (README "What we tried for TCS"), e.g. a self-supervised one with a
supervised one:

    python scripts/knn_probe.py fashion-mnist:/tmp/tcs-tune/dg /tmp/tcs-tune/dg-teacher-ssl.pt
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from pipeline.data.datasets import load_dataset
from pipeline.data.rendering import clean_views
from pipeline.methods.tcs import components_for
from pipeline.teacher.model import create_timm_model, load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("checkpoint")
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    model = create_timm_model(ckpt["model"], ckpt["num_classes"], ckpt["in_chans"], ckpt["input_size"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()

    def features(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = load_dataset(args.dataset, split)
        views = clean_views(dataset, ckpt["input_size"], ckpt["mean"], ckpt["std"])
        x = torch.stack([image for image, _ in views.__getitems__(range(len(views)))])
        with torch.no_grad():
            return model.forward_head(model.forward_features(x), pre_logits=True), torch.tensor(dataset.labels)

    (train, train_labels), (val, val_labels) = features("train"), features("val")
    nearest = (F.normalize(val, dim=1) @ F.normalize(train, dim=1).T).argmax(1)
    accuracy = (train_labels[nearest] == val_labels).double().mean().item()
    eigenvalues = torch.linalg.eigvalsh(torch.cov(train.T.double())).flip(0)
    print(f"cosine 1-NN val accuracy {100 * accuracy:.2f} %; train features need {components_for(eigenvalues, 0.9)} "
          f"components for 90 % of the variance; top eigenvalues {[round(float(v), 2) for v in eigenvalues[:3]]}")


if __name__ == "__main__":
    main()
