"""The teacher pass on a Dask LocalCluster of 2 worker processes (prefect-dask) writes the same cache as
one process: every array and every shard's sha256."""

from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.manifest import Manifest
from pipeline.cache.reader import TeacherCache


@pytest.mark.slow
def test_two_dask_worker_processes_write_the_single_process_cache(prefect_harness, cache_request,
                                                                  tmp_path: Path) -> None:
    from flows.cache_teacher import run_cache_teacher
    from pipeline.teacher.cache_pass import run_cache_pass

    fields = dict(subset=240, views=1, shard_size=60, block_size=30)
    result = run_cache_teacher(cache_request(tmp_path / "dask", **fields), runner="dask", workers=2)
    assert result.written_shards == 4
    run_cache_pass(cache_request(tmp_path / "single", **fields))
    dask, single = TeacherCache(tmp_path / "dask"), TeacherCache(tmp_path / "single")
    for name in list(single.manifest.arrays) + single.manifest.stats.arrays:
        np.testing.assert_array_equal(dask.read(name), single.read(name), err_msg=name)
    shards = {s.index: s.sha256 for s in Manifest.load(tmp_path / "single").records()}
    assert {s.index: s.sha256 for s in Manifest.load(tmp_path / "dask").records()} == shards
