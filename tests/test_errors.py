"""An error raised in a DataLoader worker is shown as its own one line, not torch's 20-line wrapper."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import DistilleryError, one_line


class ShardDamaged(DistilleryError):
    pass


class Damaged(torch.utils.data.IterableDataset):
    def __iter__(self):  # noqa: ANN204
        raise ShardDamaged("shard 3 of /c fails its sha256: it is damaged; re-run `distillery cache`")
        yield


def test_an_error_from_a_worker_is_its_original_line() -> None:
    loader = torch.utils.data.DataLoader(Damaged(), num_workers=1, batch_size=None)
    with pytest.raises(ShardDamaged) as e:
        next(iter(loader))
    assert "Original Traceback" in str(e.value)  # what torch hands back: the worker's traceback inside
    assert one_line(e.value) == "shard 3 of /c fails its sha256: it is damaged; re-run `distillery cache`"


def test_an_error_from_the_main_process_is_unchanged() -> None:
    assert one_line(ShardDamaged("a: b")) == "a: b"
