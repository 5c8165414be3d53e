"""Seed-paired differences between the rows of an experiment already run (`distillery experiment NAME`): for
each pair A:B, the mean of A minus B over the same seeds, its sample std, the paired t statistic and on how
many seeds A is above B (`pipeline.lab.experiments.paired_difference`). Reads only the runs' summary.json; runs
nothing. README "Ten seeds on one machine":

    python scripts/paired_seeds.py fmnist-fewshot --root /work/exp --seeds 10 --pair ce+tcs:ce --pair ce+tcs:ce+kd
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from pipeline.lab.experiments import get_experiment, paired_difference
from pipeline.train.summary import TrainSummary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment")
    parser.add_argument("--root", type=Path, default=Path("runs/experiments"))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    parser.add_argument("--pair", action="append", required=True, help="ROW_A:ROW_B; repeat")
    args = parser.parse_args()
    experiment = get_experiment(args.experiment)
    pairs = [tuple(p.split(":", 1)) for p in args.pair]
    rows = sorted({r for pair in pairs for r in pair})
    unknown = [r for r in rows if r not in experiment.rows]
    if unknown or any(len(pair) != 2 for pair in pairs):
        print(f"error: --pair takes ROW_A:ROW_B with rows of {args.experiment} ({', '.join(experiment.rows)}); "
              f"got {args.pair}", file=sys.stderr)
        return 2
    accuracy: dict[str, list[float]] = {}
    for row in rows:
        runs = [experiment.student_run(args.root, row, seed) / "summary.json" for seed in range(args.seeds)]
        missing = [str(r.parent) for r in runs if not r.exists()]
        if missing:
            print(f"error: no finished run at {missing[0]} ({len(missing)} missing); run `distillery experiment "
                  f"{args.experiment} --root {args.root} --row {row}` with those seeds first", file=sys.stderr)
            return 2
        accuracy[row] = [100 * TrainSummary.read(r).val_accuracy for r in runs]
        print(f"{row}: {statistics.fmean(accuracy[row]):.2f} ± {statistics.stdev(accuracy[row]):.2f} over "
              f"{args.seeds} seeds")
    for a, b in pairs:
        d = paired_difference(accuracy[a], accuracy[b])
        print(f"{a} - {b}: {d.mean:+.2f} ± {d.std:.2f}, paired t = {d.t:.2f}, {a} above on {d.above} of {d.n} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
