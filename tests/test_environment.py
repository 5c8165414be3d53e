"""`describe_environment`: what a run's summary records so that its numbers can be reproduced."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from pipeline.environment import describe_environment


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
