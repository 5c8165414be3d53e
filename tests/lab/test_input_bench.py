"""The input-pipeline bench's parts: folders of N, 2N, 4N images share bytes; the stages and models measure."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.data.datasets import load_dataset
from pipeline.lab.image_folder import FolderSpec, write_image_folder
from pipeline.lab.input_bench import linked_subset, model_samples_per_s, stage_rates


def test_input_bench_sizes_share_the_folders_bytes_and_its_stages_are_measured(tmp_path: Path) -> None:
    source = write_image_folder(tmp_path / "source", FolderSpec(train=6, val=3, classes=3))
    subset = linked_subset(source, tmp_path / "subset", train=3, val=3)
    names = sorted(p.relative_to(subset).as_posix() for p in subset.rglob("*.jpg"))
    assert names == [f"{split}/class{c}/{split}-00000{c}.jpg" for split in ("train", "val") for c in range(3)]
    assert all((subset / n).samefile(source / n) for n in names)  # hard links: no image written twice
    assert len(load_dataset(f"imagefolder:{subset}", "train")) == 3
    stages = stage_rates(source, 4)
    assert [s.stage for s in stages] == ["decode JPEG (PIL)", "render view 224 px, float32 resize",
                                        "render view 224 px, uint8 resize"]
    assert all(s.per_core > 0 for s in stages)
    assert model_samples_per_s("test_resnet", torch.device("cpu"), batch_size=2, steps=1) > 0
