"""How well a teacher checkpoint's pooled view-0 features separate the classes: cosine 1-NN accuracy of the
val images against the train images and, with `--subset N`, also a linear probe (multinomial logistic
regression on standardised features) fitted on the same seeded, stratified N train images the experiments
cache (`distillery cache --subset N`): what a linear classifier on this teacher's geometry reaches with
those labels alone. `--pixels` prints the same figures for the raw pixels of the same normalised views, the
baseline a teacher's geometry has to beat to be worth aligning a student to.

A label-free way to compare teachers (README "What we tried for TCS"), e.g. a self-supervised one with a
supervised one:

    python scripts/knn_probe.py fashion-mnist:/tmp/tcs-tune/dg /tmp/tcs-tune/dg-teacher-ssl.pt
    python scripts/knn_probe.py fashion-mnist runs/teachers/fashion-mnist-resnet10t-e6-ssl.pt --subset 100 --pixels
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.data.datasets import load_dataset
from pipeline.data.rendering import clean_views
from pipeline.methods.tcs import components_for
from pipeline.nets.tapped import create_timm_model
from pipeline.teacher.checkpoint import TeacherCheckpoint


def report(name: str, train: torch.Tensor, train_labels: torch.Tensor, val: torch.Tensor, val_labels: torch.Tensor,
           linear_probe: bool) -> None:
    nearest = (F.normalize(val, dim=1) @ F.normalize(train, dim=1).T).argmax(1)
    accuracy = (train_labels[nearest] == val_labels).double().mean().item()
    eigenvalues = torch.linalg.eigvalsh(torch.cov(train.T.double())).flip(0)
    print(f"{name}, {len(train)} labelled train images: cosine 1-NN val accuracy {100 * accuracy:.2f} %; "
          f"{train.shape[1]}-d, {components_for(eigenvalues, 0.9)} components for 90 % of the variance; "
          f"top eigenvalues {[round(float(v), 2) for v in eigenvalues[:3]]}")
    if linear_probe:
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(train.numpy(), train_labels.numpy())
        print(f"{name}, linear probe on those {len(train)}: val accuracy "
              f"{100 * probe.score(val.numpy(), val_labels.numpy()):.2f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("checkpoint")
    parser.add_argument("--subset", type=int, default=None,
                        help="labelled train images: the seeded, stratified subset `distillery cache --subset` takes")
    parser.add_argument("--pixels", action="store_true", help="the same figures for the raw pixels of the views")
    args = parser.parse_args()
    ckpt = TeacherCheckpoint.load(args.checkpoint)
    model = create_timm_model(ckpt.model, ckpt.num_classes, ckpt.in_chans, ckpt.input_size)
    model.load_state_dict(ckpt.state_dict)
    model.eval()

    def features(split: str, subset: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(teacher features, flattened pixels, labels) of the split's view 0."""
        dataset = load_dataset(args.dataset, split, subset=subset)
        views = clean_views(dataset, ckpt.input_size, ckpt.mean, ckpt.std)
        pooled, pixels = [], []
        with torch.no_grad():
            for start in range(0, len(views), 1024):
                x = torch.stack([image for image, _ in views.__getitems__(range(start, min(start + 1024, len(views))))])
                pooled.append(model.forward_head(model.forward_features(x), pre_logits=True))
                if args.pixels:
                    pixels.append(x.flatten(1))
        return torch.cat(pooled), torch.cat(pixels) if pixels else torch.empty(0), torch.tensor(dataset.labels)

    (train, train_pixels, train_labels), (val, val_pixels, val_labels) = features("train", args.subset), features("val")
    report("teacher", train, train_labels, val, val_labels, args.subset is not None)
    if args.pixels:
        report("pixels", train_pixels, train_labels, val_pixels, val_labels, args.subset is not None)


if __name__ == "__main__":
    main()
