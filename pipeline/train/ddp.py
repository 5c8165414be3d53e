"""DDP primitives: one student trained by N processes with DistributedDataParallel
(docs/operations.md#distributed-students). `pipeline.train.launch` starts the processes under torchrun;
`train_student` uses these pieces, so the same loop trains one process or N.

torchrun names each process (rank) in its environment (RANK, WORLD_SIZE, LOCAL_RANK), read by `World.from_env`:

- each rank streams its own contiguous run of the cache's blocks (`stream.rank_parts`): every sample id is
  trained on exactly once per epoch across the ranks, in its view `epoch_views(seed, epoch, id)`;
- the student and its methods are one module (`DistillStep`) wrapped in DDP, so trainable method modules
  (projectors, the TCS head, ScaleKD's modules) have their gradients averaged with the student's;
- a rank's batch counts as its share of the step's global batch (`step_totals`): the averaged gradient is
  the gradient of the mean loss over every rank's samples of that step, as one process would compute it;
- ranks whose blocks give fewer batches repeat their last batch at weight zero until every rank has taken
  `CacheStream.steps_per_epoch` steps (`equalised`): DDP needs the same number of backward passes on
  every rank, and no sample is trained on twice;
- rank 0 alone holds the run directory's lock and writes config, metrics, checkpoints and the summary.

Setting `DISTILLERY_ID_LOG=DIR` makes every rank log the (id, view) pairs of each step to DIR/rank-R.jsonl
(`IdLog`: the tests' proof of exactly-once).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.methods import TrainingProgress
from pipeline.train.config import TrainError
from pipeline.train.stream import rank_parts
from pipeline.train.student import Student

ID_LOG_ENV = "DISTILLERY_ID_LOG"


@dataclass(frozen=True)
class World:
    """This process's place among the ranks training one student (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        """torchrun's RANK, WORLD_SIZE and LOCAL_RANK, or a single process without them."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory and reports progress."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """Each rank its own GPU (`cuda:LOCAL_RANK`) when the run asks for CUDA without an index."""
        if self.size > 1 and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def identity(self) -> dict[str, int]:
        """What a resumed run must match besides the config: the world size, which sets the global batch
        (a single process adds nothing, so runs made before DDP existed resume)."""
        return {"world_size": self.size} if self.size > 1 else {}

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def under_torchrun() -> bool:
    """Whether torchrun started this process (its environment names a rank)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """The ranks' process group for one run (gloo on CPU, nccl on CUDA); nothing for a single process."""
    if world.size == 1:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # A rank that fails makes torchrun stop the others; the timeout bounds a wait that could still hang.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank, world_size=world.size,
                            timeout=timedelta(minutes=10))
    try:
        yield
    finally:
        dist.destroy_process_group()


class DistillStep(nn.Module):
    """The student and its methods as one module, what DDP wraps: x -> the methods' loss terms."""

    def __init__(self, student: Student, methods: nn.ModuleDict) -> None:
        super().__init__()
        self.student, self.methods = student, methods

    def forward(self, x: torch.Tensor, targets: dict[str, Any], labels: torch.Tensor,
                progress: TrainingProgress) -> dict[str, torch.Tensor]:
        outputs = self.student(x)
        return {k: v for m in self.methods.values() for k, v in m(outputs, targets, labels, progress).items()}


def wrap(step: DistillStep, world: World, device: torch.device) -> nn.Module:
    """`step` itself for one process, else DDP over it. Unused parameters are allowed: a method may leave
    a module out of some steps, and a rank's padding step still runs the whole forward."""
    if world.size == 1:
        return step
    return DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


@dataclass(frozen=True)
class StepTotals:
    """One step over every rank: its samples, the mean loss and terms over them, whether all were finite."""

    samples: int
    loss: float
    terms: dict[str, float]
    finite: bool

    def weight(self, samples: int, world: World) -> float:
        """A rank's loss multiplier: DDP averages gradients over the ranks, so weighting rank r by
        W * n_r / sum(n) makes the average the gradient of the mean over the step's sum(n) samples."""
        return world.size * samples / self.samples


def step_totals(world: World, samples: int, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> StepTotals:
    """Sum the step's sample count, sample-weighted loss and terms, and non-finite flags over the ranks
    (one all-reduce, before the backward pass, so that every rank stops together on a non-finite loss)."""
    values = torch.stack([loss.detach().float(), *(t.detach().float() for t in terms.values())]).double()
    packed = torch.cat([torch.tensor([samples, float(not torch.isfinite(values).all())], dtype=torch.float64,
                                     device=values.device), samples * values])
    if world.size > 1:
        dist.all_reduce(packed)
    total, bad = int(packed[0].item()), packed[1].item()
    means = (packed[2:] / max(total, 1)).tolist()
    return StepTotals(total, means[0], dict(zip(terms, means[1:], strict=True)), bad == 0)


def equalised(batches: Iterable[dict[str, Any]], steps: int) -> Iterator[tuple[dict[str, Any], bool]]:
    """(batch, real) for exactly `steps` steps: this rank's batches, then its last batch again, not real
    (trained at weight zero), until `steps`. More batches than `steps` is a TrainError."""
    last, count = None, 0
    for last in batches:
        count += 1
        if count > steps:
            raise TrainError(f"the stream gave more than the {steps} batches planned per epoch; the cache's "
                             f"shards do not match its manifest")
        yield last, True
    if last is None:
        raise TrainError("this rank's share of the cache gave no batch; the cache's shards do not match its "
                         "manifest")
    for _ in range(steps - count):
        yield last, False


def check_world(blocks: list[list[int]], world_size: int) -> None:
    """Every rank must have blocks to read (`rank_parts`; `blocks`: samples per block of each shard)."""
    idle = [r for r in range(world_size) if not rank_parts(blocks, r, world_size)]
    if idle:
        raise TrainError(f"{world_size} processes but the cache's {sum(map(len, blocks))} blocks leave rank(s) "
                         f"{idle} nothing to read; use fewer processes")


class IdLog:
    """Per-rank log of the (id, view) pairs each real step trained on: DIR/rank-R.jsonl, one line per step."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_env(cls, world: World) -> IdLog | None:
        where = os.environ.get(ID_LOG_ENV)
        return cls(Path(where) / f"rank-{world.rank}.jsonl") if where else None

    def write(self, epoch: int, step: int, ids: torch.Tensor, views: torch.Tensor) -> None:
        # Appended and flushed per step, so a test can kill the run mid-epoch and still read it.
        with open(self.path, "a") as f:
            f.write(json.dumps({"epoch": epoch, "step": step, "ids": ids.tolist(), "views": views.tolist()}) + "\n")
