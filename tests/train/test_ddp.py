"""DDP primitives (docs/operations.md#distributed-students): the module DDP wraps, the step's totals over the
ranks, padding steps and the check that every rank has blocks to read. Real torchrun runs: test_launch.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pipeline.train.config import TrainConfig, TrainError
from pipeline.train.ddp import DistillStep, World, equalised, step_totals, wrap
from pipeline.train.loop import check_run, setup_run


def test_method_modules_are_inside_the_ddp_module(digits_cache: Path, tmp_path: Path) -> None:
    config = TrainConfig(cache=str(digits_cache), student="test_resnet", methods=("ce", "tcs", "fitnet"),
                         out=str(tmp_path / "run"))
    setup = setup_run(config, torch.device("cpu"))
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = wrap(DistillStep(setup.student, setup.methods), World(0, 2, 0), torch.device("cpu"))
        wrapped = {id(p) for p in ddp.parameters()}
        for name in ("tcs", "fitnet"):
            own = {id(p) for p in setup.methods[name].parameters()}
            assert own and own <= wrapped
    finally:
        dist.destroy_process_group()


def test_padding_steps_repeat_the_last_batch_at_weight_zero() -> None:
    assert list(equalised(iter(["a", "b"]), 4)) == [("a", True), ("b", True), ("b", False), ("b", False)]
    with pytest.raises(TrainError, match="more than the 1 batches"):
        list(equalised(iter(["a", "b"]), 1))
    totals = step_totals(World(), 0, torch.tensor(2.0), {"ce": torch.tensor(2.0)})
    assert totals.samples == 0 and totals.finite
    one = step_totals(World(), 8, torch.tensor(float("nan")), {"ce": torch.tensor(float("nan"))})
    assert not one.finite and one.weight(8, World()) == 1.0


def test_more_processes_than_blocks_is_refused_in_one_line(make_cache, tmp_path: Path) -> None:
    cache = make_cache(n=40, shard_size=40, block_size=32)  # 2 blocks
    with pytest.raises(TrainError, match=r"3 processes but the cache's 2 blocks leave rank\(s\) \[0\] nothing"):
        check_run(TrainConfig(cache=str(cache), student="test_resnet", methods=("ce",), out=str(tmp_path / "run")),
                  world_size=3)
