"""DataLoader worker start methods side by side: `python -m pipeline.lab.loader_bench [--epochs E]`.

Training loaders start their workers from a fork server (`pipeline.data.rendering.worker_context`) so
that they survive the threads a Prefect flow leaves in the process. This measures what that costs
against plain `fork` (what the loaders used before) and `spawn`: each method runs in a fresh process
over the same small cache (digits, untrained `test_resnet`, 2 workers) and reports its first epoch
(which pays the workers' start, and for forkserver the server's one start per process) and the mean of
the later epochs, with ratios to fork.
"""

import argparse
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("fork", "forkserver", "spawn")


def epoch_seconds(cache: str, method: str, epochs: int, workers: int) -> list[float]:
    import torch

    from pipeline.cache.reader import TeacherCache
    from pipeline.data.rendering import worker_context
    from pipeline.train.stream import CacheStream

    c = TeacherCache(cache)
    stream = CacheStream(c, 32, frozenset(c.available_targets()), seed=0, shuffle_buffer=256)
    context = worker_context(workers) if method == "forkserver" else multiprocessing.get_context(method)
    seconds = []
    for epoch in range(epochs):
        start = time.perf_counter()
        for _ in torch.utils.data.DataLoader(stream.dataset(epoch), batch_size=64, num_workers=workers,
                                             multiprocessing_context=context):
            pass
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=800)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # one measurement (a child)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(epoch_seconds(args.cache, args.method, args.epochs, args.workers)))
        return

    from pipeline.teacher.plan import CacheRequest
    from pipeline.teacher.cache_pass import run_cache_pass

    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "cache")
        run_cache_pass(CacheRequest(dataset="digits", teacher="test_resnet", out=cache, subset=args.samples,
                                    views=2, shard_size=args.samples // 4, device="cpu"))
        results = {}
        for method in METHODS:
            child = subprocess.run([sys.executable, "-m", "pipeline.lab.loader_bench", "--method", method, "--cache", cache,
                                    "--epochs", str(args.epochs), "--workers", str(args.workers)],
                                   capture_output=True, text=True, check=True)
            results[method] = json.loads(child.stdout.strip().splitlines()[-1])
    views = args.samples  # each epoch streams one view of every sample
    print(f"{views} samples per epoch, {args.workers} workers, batch 64, {args.epochs} epochs per method")
    print(f"{'method':<11} {'epoch 0 s':>9} {'later s':>8} {'later samples/s':>15} {'epoch 0 / fork':>14} "
          f"{'later / fork':>12}")
    fork0, fork_later = results["fork"][0], sum(results["fork"][1:]) / max(1, args.epochs - 1)
    for method, seconds in results.items():
        later = sum(seconds[1:]) / max(1, len(seconds) - 1)
        print(f"{method:<11} {seconds[0]:>9.2f} {later:>8.2f} {views / later:>15.0f} {seconds[0] / fork0:>14.2f} "
              f"{later / fork_later:>12.2f}")


if __name__ == "__main__":
    main()
