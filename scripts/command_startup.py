"""Wall time of `distillery` commands, side by side, best of `--rounds` alternating rounds, each in a fresh
process (docs/results.md#command-start-up):

- help screens: `distillery --help` and a command's help, with the load average beside them (its modules import
  no torch: under 1 s on an idle machine), and the bare interpreter (`python -c pass`) and the command line's
  own libraries (typer, rich, pydantic) as the floor under them;
- with `--before CHECKOUT` (a checkout of the code to compare with, e.g. a `git worktree` of an older commit):
  the same help screens rendered by that checkout (in a fresh cache home: nothing kept), and a tiny `cache`
  (256 digits, 1 view, an untrained test_resnet) and a tiny `train` from it (1 epoch), run by that checkout and
  by this one, without PREFECT_API_URL: the start-up a local command pays before its first teacher or student
  batch, which these tiny runs are made of.

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


FLOORS = {"python -c pass": ["-c", "pass"],
          "import typer, rich, pydantic": ["-c", "import typer, typer.rich_utils, rich.progress, pydantic"]}


def wall_seconds(args: list[str], cache_home: str, root: Path = ROOT, python_args: list[str] | None = None) -> float:
    """Wall seconds of `distillery ARGS` (or of `python PYTHON_ARGS`) in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(root), "XDG_CACHE_HOME": cache_home}
    env.pop("PREFECT_API_URL", None)
    start = time.perf_counter()
    subprocess.run([sys.executable, *(python_args or ["-m", "flows.cli", *args])], cwd=root, env=env,
                   stdout=subprocess.DEVNULL, check=True)
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
    parser.add_argument("--before", type=Path, help="a checkout to compare the help screens and the tiny cache "
                                                     "and train with")
    parser.add_argument("--runs-only", action="store_true", help="skip the help screens")
    args = parser.parse_args()
    rounds = args.rounds
    shown: dict[str, float] = {}
    before: dict[str, float] = {}  # the same help screens rendered by the --before checkout (nothing kept)
    load_before = os.getloadavg()[0]
    for _ in range(0 if args.runs_only else rounds):
        for name, python_args in FLOORS.items():
            with tempfile.TemporaryDirectory() as fresh:
                shown[name] = min(shown.get(name, float("inf")), wall_seconds([], fresh, python_args=python_args))
        for command in COMMANDS:
            name = "distillery " + " ".join(command)
            with tempfile.TemporaryDirectory() as fresh:
                shown[name] = min(shown.get(name, float("inf")), wall_seconds(command, fresh))
            if args.before is not None:
                with tempfile.TemporaryDirectory() as fresh:
                    before[name] = min(before.get(name, float("inf")),
                                       wall_seconds(command, fresh, args.before.resolve()))
    if shown:
        floor = shown["import typer, rich, pydantic"]
        print(f"{'help screen':<30} {'now s':>6} {'/ typer+rich+pydantic':>22} {'before s':>9} {'now / before':>13}"
              f"  (best of {rounds}, load {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)")
        for name, seconds in shown.items():
            then = f"{before[name]:>9.2f} {seconds / before[name]:>13.2f}" if name in before else f"{'-':>9} {'-':>13}"
            print(f"{name:<30} {seconds:>6.2f} {seconds / floor:>22.2f} {then}")
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
