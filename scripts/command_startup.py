"""Wall time of `distillery` commands, side by side, best of `--rounds` alternating rounds, each in a fresh
process (docs/results.md#command-start-up):

- help screens: a command's help rendered (its module imports the configs, hence torch) against the same screen
  printed from the kept copy (flows/cli/help_cache.py);
- with `--before CHECKOUT` (a checkout of the code to compare with, e.g. a `git worktree` of an older commit):
  a tiny `cache` (256 digits, 1 view, an untrained test_resnet) and a tiny `train` from it (1 epoch), run by
  that checkout and by this one, without PREFECT_API_URL: the start-up a local command pays before its first
  teacher or student batch, which these tiny runs are made of.

    python scripts/command_startup.py --rounds 3 [--before /path/to/older/checkout]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (["--help"], ["cache", "--help"], ["train", "--help"], ["fit-teacher", "--help"], ["runs", "--help"])


def wall_seconds(args: list[str], cache_home: str, root: Path = ROOT) -> float:
    env = {**os.environ, "PYTHONPATH": str(root), "XDG_CACHE_HOME": cache_home}
    env.pop("PREFECT_API_URL", None)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=root, env=env, stdout=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - start


def tiny_runs(root: Path, work: str) -> tuple[float, float]:
    """Wall seconds of a tiny `cache` and a tiny `train` from it, run by the checkout at `root`."""
    cache, run = f"{work}/cache", f"{work}/run"
    cached = wall_seconds(["cache", "--dataset", "digits", "--teacher", "test_resnet", "--subset", "256", "--views",
                           "1", "--device", "cpu", "--out", cache], work, root)
    trained = wall_seconds(["train", "--cache", cache, "--student", "test_resnet", "--method", "ce", "--epochs", "1",
                            "--workers", "0", "--device", "cpu", "--out", run], work, root)
    return cached, trained


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", type=Path, help="a checkout to compare the tiny cache and train with")
    parser.add_argument("--runs-only", action="store_true", help="skip the help screens")
    args = parser.parse_args()
    rounds = args.rounds
    rendered: dict[str, float] = {}
    kept: dict[str, float] = {}
    for _ in range(0 if args.runs_only else rounds):
        for command in COMMANDS:
            name = " ".join(command)
            with tempfile.TemporaryDirectory() as fresh:  # nothing kept: rendered, then kept
                rendered[name] = min(rendered.get(name, float("inf")), wall_seconds(command, fresh))
                kept[name] = min(kept.get(name, float("inf")), wall_seconds(command, fresh))
    if rendered:
        print(f"{'command':<22} {'rendered s':>10} {'kept s':>8} {'kept / rendered':>16}  (best of {rounds}, "
              f"load {os.getloadavg()[0]:.1f})")
        for name in rendered:
            print(f"{name:<22} {rendered[name]:>10.2f} {kept[name]:>8.2f} {kept[name] / rendered[name]:>16.2f}")
    if args.before is None:
        return 0
    best: dict[tuple[str, str], float] = {}
    for _ in range(rounds):
        for label, root in (("before", args.before.resolve()), ("now", ROOT)):
            with tempfile.TemporaryDirectory() as work:
                for command, seconds in zip(("cache", "train"), tiny_runs(root, work)):
                    best[label, command] = min(best.get((label, command), float("inf")), seconds)
    print(f"{'tiny run, no PREFECT_API_URL':<30} {'before s':>9} {'now s':>7} {'now / before':>13}  (best of {rounds}, "
          f"load {os.getloadavg()[0]:.1f})")
    for command in ("cache", "train"):
        before, now = best["before", command], best["now", command]
        print(f"{command:<30} {before:>9.2f} {now:>7.2f} {now / before:>13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
