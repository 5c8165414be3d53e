"""The torchrun launcher of distributed students (docs/operations.md#distributed-students).

`launch` runs ``torchrun --standalone --nproc-per-node N -m pipeline.train.launch CONFIG_JSON``: each process
is one rank of one run (`main`), trained by `train_student` with the DDP primitives of `pipeline.train.ddp`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from pipeline.errors import DistilleryError
from pipeline.object_store import location
from pipeline.train.config import TrainConfig, TrainError
from pipeline.train.ddp import World
from pipeline.train.loop import train_student
from pipeline.train.rundir import SUMMARY
from pipeline.train.summary import TrainSummary


def torchrun_command(nproc: int, config: TrainConfig) -> list[str]:
    """torchrun on this machine (`--standalone`: a rendezvous on a free localhost port) running
    `nproc` ranks of this module for `config`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "pipeline.train.launch", json.dumps(config.to_dict())]


def launch(config: TrainConfig, nproc: int, quiet: bool = False, threads: int | None = None) -> TrainSummary:
    """Train `config` with `nproc` processes under torchrun; the run's summary (RUNDIR/summary.json).
    `quiet`: keep the ranks' output, and show its end only if the run fails. `threads`: torch threads per
    process (OMP_NUM_THREADS; default: torchrun's, 1 per process when there are several)."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    done = subprocess.run(torchrun_command(nproc, config), check=False, capture_output=quiet, text=True, env=env)
    if done.returncode != 0:
        lines = f"{done.stdout or ''}{done.stderr or ''}".strip().splitlines()  # None unless quiet
        errors = [line for line in lines if line.startswith("error (rank")]  # what `main` prints
        said = "its ranks' output above says why" if not quiet else f"its ranks said: {' | '.join(errors or lines[-3:])}"
        raise TrainError(f"the {nproc}-process run of {config.student} into {config.out} failed (exit "
                         f"{done.returncode}); {said}")
    return TrainSummary.read(location(config.out) / SUMMARY)


def main(argv: list[str]) -> int:
    """One rank of one run: a bad input is one line on stderr and exit status 2."""
    world = World.from_env()
    if world.is_main:  # the epoch lines; the other ranks' would repeat them
        logging.basicConfig(format="%(message)s")  # other libraries' at WARNING: s3fs's botocore says much at INFO
        logging.getLogger("distillery").setLevel(logging.INFO)
    try:
        train_student(TrainConfig(**json.loads(argv[0])))
    except DistilleryError as e:
        print(f"error (rank {world.rank}): {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
