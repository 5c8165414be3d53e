"""Wall time of `distillery` help screens, side by side: a command's help rendered (its module imports the
configs, hence torch) against the same screen printed from the kept copy (flows/cli/help_cache.py), best of
`--rounds` alternating rounds, each command in a fresh process. docs/results.md#command-start-up:

    python scripts/command_startup.py --rounds 3
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


def wall_seconds(args: list[str], cache_home: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": cache_home}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    rendered: dict[str, float] = {}
    kept: dict[str, float] = {}
    for _ in range(rounds):
        for args in COMMANDS:
            name = " ".join(args)
            with tempfile.TemporaryDirectory() as fresh:  # nothing kept: rendered, then kept
                rendered[name] = min(rendered.get(name, float("inf")), wall_seconds(args, fresh))
                kept[name] = min(kept.get(name, float("inf")), wall_seconds(args, fresh))
    print(f"{'command':<22} {'rendered s':>10} {'kept s':>8} {'kept / rendered':>16}  (best of {rounds}, "
          f"load {os.getloadavg()[0]:.1f})")
    for name in rendered:
        print(f"{name:<22} {rendered[name]:>10.2f} {kept[name]:>8.2f} {kept[name] / rendered[name]:>16.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
