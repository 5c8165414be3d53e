"""The TCS sweep behind the README's "What we tried for TCS": every setting on a cache of held-out-train data.

The cache is of `fashion-mnist:DIR` made by `scripts/holdout_split.py` (its val split is part of the original
TRAIN split), so choices never see the test split. One JSON line per run is appended to OUT (a rerun skips the
settings already there):

    python scripts/tcs_sweep.py CACHE OUT.jsonl --epochs 10 --seed 0 --setting "ce" --setting "ce;tcs:keep=1" ...
    python scripts/tcs_sweep.py CACHE OUT.jsonl --table      # mean ± std over seeds per setting, as markdown
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from pipeline.atomic import atomic_write_text
from pipeline.train.config import RunSettings, TrainConfig
from pipeline.train.loop import train_student
from pipeline.train.optim import OptimConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache")
    parser.add_argument("out", type=Path)
    parser.add_argument("--setting", action="append", default=[], help="methods, ';'-separated")
    parser.add_argument("--table", action="store_true", help="print the results in OUT for CACHE and stop")
    parser.add_argument("--student", default="test_resnet")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, action="append")
    args = parser.parse_args()
    done = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    if args.table:
        print(markdown(r for r in done if r["cache"] == args.cache))
        return
    for seed in args.seed or [0]:
        for setting in args.setting:
            key = {"cache": args.cache, "setting": setting, "seed": seed, "epochs": args.epochs,
                   "batch_size": args.batch_size, "lr": args.lr, "student": args.student}
            if any(all(d.get(k) == v for k, v in key.items()) for d in done):
                continue
            settings = RunSettings(epochs=args.epochs, seed=seed, batch_size=args.batch_size,
                                   optim=OptimConfig(lr=args.lr), eval_every=args.epochs, workers=0, device="cpu")
            with tempfile.TemporaryDirectory(prefix="tcs-sweep-") as tmp:
                summary = train_student(TrainConfig(cache=args.cache, student=args.student,
                                                    methods=tuple(setting.split(";")), out=tmp, settings=settings))
            done.append({**key, "val_accuracy": summary.val_accuracy, "train_seconds": summary.train_seconds})
            atomic_write_text(args.out, "".join(json.dumps(d) + "\n" for d in done))
            print(f"{setting} seed {seed}: {100 * summary.val_accuracy:.2f}", flush=True)


def markdown(records) -> str:
    """One row per setting, in the order first run: accuracy mean ± sample std over seeds, and each seed's."""
    by_setting: dict[str, list[dict]] = {}
    for r in records:
        by_setting.setdefault(r["setting"], []).append(r)
    lines = ["| methods | held-out accuracy % (mean ± std) | per seed |", "|---|---|---|"]
    for setting, runs in by_setting.items():
        acc = [100 * r["val_accuracy"] for r in sorted(runs, key=lambda r: r["seed"])]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        lines.append(f"| `{setting.replace(';', ' + ')}` | {statistics.fmean(acc):.2f} ± {std:.2f} | "
                     f"{' / '.join(f'{a:.2f}' for a in acc)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
