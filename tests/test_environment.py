"""`describe_environment` and the RSS helpers: what a run's summary records to reproduce its numbers and what it used."""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from pipeline.environment import describe_environment, peak_rss_bytes, rss_bytes


def test_records_the_kernel_capability_threads_and_versions_in_use() -> None:
    env = describe_environment(torch.device("cpu"))
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["threads"] == torch.get_num_threads() and env["device"] == "cpu"
    assert env["versions"]["torch"] == torch.__version__ and env["versions"]["timm"]
    assert json.loads(json.dumps(env)) == env  # it goes into summary.json


def test_follows_the_knobs_that_change_the_kernels() -> None:
    code = "import json, torch; from pipeline.environment import describe_environment as d; " \
           "print(json.dumps(d(torch.device('cpu'))))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}
    out = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True).stdout)
    assert out["cpu_capability"] == "DEFAULT" and out["threads"] == 1
    assert out["env"] == {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}


def test_peak_rss_of_a_process_spawned_by_a_large_parent_is_its_own() -> None:
    ballast = np.ones(2**30 // 8)  # 1 GiB resident in this process
    parent = 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        child = pool.submit(peak_rss_bytes).result()
    del ballast
    assert 0 < child < parent - 2**29, (child, parent)  # ru_maxrss alone would report the parent's peak


def test_rss_now_rises_and_falls_with_memory_held_while_the_peak_stays() -> None:
    before = rss_bytes()
    ballast = np.ones(2**28 // 8)  # 256 MiB, touched
    held = rss_bytes()
    del ballast
    after = rss_bytes()
    assert held - before > 2**27 and held - after > 2**27, (before, held, after)
    assert peak_rss_bytes() >= held
