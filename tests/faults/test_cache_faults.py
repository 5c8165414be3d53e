"""Faults of a cache from an untrusted source or a damaged disk (issue 13; README "Security model and integrity").

One small complete digits cache per module (every kind of file: shards, zarr rows, statistics, LSH codes and
index, teacher tail); each test copies it, injects one fault, and asserts one of: refused or detected with one
line naming the culprit (file, field or array), or recovered to the same bytes as the uninterrupted run. Nothing
is executed, nothing is written outside the cache, nothing is trained on wrong data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from forgery import SMALL_CACHE
from pipeline.cache.manifest import CacheError, Manifest
from pipeline.cache.blocks import decode_block, iter_tar_members
from pipeline.cache.inputs import raw_count, unpack_raw
from pipeline.cache.reader import TeacherCache
from pipeline.cache.writer import CacheWriter
from pipeline.checksums import sha256_file
from pipeline.cache.targets import LOGITS, LSH_CODES
from pipeline.cache.statistics import recompute_statistics
from pipeline.teacher.cache_pass import run_cache_pass
from pipeline.teacher.checkpoint import TeacherCheckpoint
from pipeline.teacher.model import TeacherError
from pipeline.teacher.verify import repair_cache, verify_cache
from pipeline.train.loop import open_cache
from pipeline.train.stream import CacheStream

REPO = Path(__file__).resolve().parents[2]
@pytest.fixture(scope="module")
def request_for(cache_request) -> Callable[[Path], object]:
    return lambda out: cache_request(out, **SMALL_CACHE)


@pytest.fixture(scope="module")
def good(small_cache: Path) -> Path:
    """The complete cache every test copies (tests/faults/conftest.py `small_cache`)."""
    return small_cache


@pytest.fixture
def cache(forged: Path) -> Path:
    return forged


def edit_manifest(root: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads((root / "manifest.json").read_text())
    edit(data)
    (root / "manifest.json").write_text(json.dumps(data))


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd or REPO, env=env, check=False)


def cli_error(result: subprocess.CompletedProcess) -> str:
    """The one error line of a refused command (exit 2, no traceback)."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def recommended(message: str) -> list[str]:
    """The `distillery ...` command an error message recommends, as CLI arguments."""
    found = re.findall(r"`distillery ([^`]+)`", message)
    assert found, f"no command recommended in: {message}"
    return found[0].split()


def same_bytes(a: Path, b: Path) -> None:
    """Every file of cache `b` has the bytes of cache `a`'s (the manifest up to its timestamps). The writer
    lock and the HTML report the Prefect flow leaves beside the cache are not part of its contract."""
    def contract_files(root: Path) -> list[Path]:
        return sorted(p.relative_to(root) for p in root.rglob("*")
                      if p.is_file() and p.name not in (".writer.lock", "report.html"))

    files = contract_files(a)
    assert files == contract_files(b)
    def untimed(path: Path) -> dict:
        return {k: v for k, v in json.loads(path.read_text()).items() if k not in ("created", "completed")}

    for rel in files:
        if rel.name == "manifest.json":
            assert untimed(a / rel) == untimed(b / rel)
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def first_chunk(root: Path, array: str) -> Path:
    return min(p for p in (root / "arrays.zarr" / array / "c").rglob("*") if p.is_file())


def stream_all(root: Path, targets: frozenset[str] = frozenset({LOGITS})) -> int:
    stream = CacheStream(open_cache(str(root)), size=16, targets=targets, seed=0)
    return sum(len(b["id"]) for b in stream.loader(0, batch_size=32, workers=0))


# ---------------------------------------------------------------------------------------------------------
# Paths: confined to the cache, never handed to a URL parser
# ---------------------------------------------------------------------------------------------------------


def test_a_pipe_url_as_shard_file_runs_nothing(cache: Path, tmp_path: Path) -> None:
    """The issue's exploit: `pipe:...;touch X` as a shard's file, a file of that name in the cache so its
    sha256 matches. `distillery train` refuses the cache naming the field; X never appears."""
    name = "pipe:cat shards/train-000000.tar;touch X"
    crafted = cache / name
    crafted.parent.mkdir(parents=True)
    shutil.copy(cache / "shards" / "train-000000.tar", crafted)
    edit_manifest(cache, lambda m: m["shards"][0].update(file=name))
    work = tmp_path / "work"
    work.mkdir()
    line = cli_error(run_cli("train", "--cache", str(cache), "--student", "test_resnet", "--method", "ce",
                             "--out", str(work / "run"), "--epochs", "1", "--device", "cpu", cwd=work))
    assert "shards[0].file" in line
    assert not list(work.rglob("X")) and not list(cache.rglob("X")) and not (REPO / "X").exists()


def test_a_shard_named_like_a_url_inside_shards_is_read_as_a_plain_file(cache: Path, tmp_path: Path) -> None:
    """A shard file whose name webdataset would take for a URL, inside `shards/`: refused before the stream."""
    edit_manifest(cache, lambda m: m["shards"][1].update(file="shards/pipe:touch X"))
    with pytest.raises(CacheError, match=r"shards\[1\]\.file") as e:
        stream_all(cache)
    one_line(e.value)
    assert not list(tmp_path.rglob("X"))


OPENERS: dict[str, Callable[[Path], object]] = {
    "train": lambda root: open_cache(str(root)),
    "verify": lambda root: verify_cache(root, samples=4),
    "inspect": lambda root: TeacherCache(root, require_complete=False),
    "stats": lambda root: recompute_statistics(str(root)),
}


@pytest.mark.parametrize("command", sorted(OPENERS))
@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "shards/../../outside.tar", ""])
def test_shard_paths_outside_the_cache_are_refused(cache: Path, command: str, path: str) -> None:
    edit_manifest(cache, lambda m: m["shards"][2].update(file=path))
    with pytest.raises(CacheError, match=r"shards\[2\]\.file") as e:
        OPENERS[command](cache)
    one_line(e.value)


@pytest.mark.parametrize("command", sorted(OPENERS))
def test_a_shard_symlinked_outside_the_cache_is_refused(cache: Path, tmp_path: Path, command: str) -> None:
    """Same bytes (its sha256 matches), but the file lies outside: compared after resolving symlinks."""
    outside = tmp_path / "elsewhere.tar"
    shard = cache / "shards" / "train-000001.tar"
    shutil.copy(shard, outside)
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(CacheError, match=r"shards\[1\]\.file .* resolves outside") as e:
        OPENERS[command](cache)
    one_line(e.value)


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["files"]["teacher_tail"].update(file="../tail.pt"), "files.teacher_tail.file"),
    (lambda m: m["stats"]["lsh"].update(index="/etc/passwd"), "stats.lsh.index"),
])
def test_side_file_names_other_than_the_cache_s_own_are_refused(cache: Path, edit, field: str) -> None:
    edit_manifest(cache, edit)
    with pytest.raises(CacheError, match=re.escape(field)) as e:
        TeacherCache(cache)
    one_line(e.value)


@pytest.mark.parametrize("name", ["manifest.json", "arrays.zarr", "lsh.faiss", "teacher_tail.pt"])
def test_cache_files_symlinked_outside_are_refused(cache: Path, tmp_path: Path, name: str) -> None:
    outside = tmp_path / "outside" / name
    outside.parent.mkdir()
    shutil.move(cache / name, outside)
    (cache / name).symlink_to(outside)
    before = sorted((p, p.read_bytes()) for p in outside.parent.rglob("*") if p.is_file())
    for command in (lambda: TeacherCache(cache), lambda: recompute_statistics(str(cache))):
        with pytest.raises(CacheError, match=re.escape(name)) as e:
            command()
        one_line(e.value)
    assert sorted((p, p.read_bytes()) for p in outside.parent.rglob("*") if p.is_file()) == before


def test_symlinked_temp_and_lock_names_write_nothing_outside(cache: Path, tmp_path: Path) -> None:
    """Symlinks planted under every predictable name a writer could use: `distillery stats` rewrites the
    statistics, LSH index and manifest without touching their targets."""
    victims = []
    for name in ["manifest.json.tmp", "lsh.faiss.tmp", ".stats-staging-x", "arrays.zarr/stats/cka/ir.tmp"]:
        victim = tmp_path / "victims" / name.replace("/", "_")
        victim.parent.mkdir(exist_ok=True)
        victim.write_text("precious")
        (cache / name).symlink_to(victim)
        victims.append(victim)
    recompute_statistics(str(cache), lsh_bits=32)
    assert all(v.read_text() == "precious" for v in victims)
    assert TeacherCache(cache).verify_integrity() == []
    (cache / ".writer.lock").unlink()
    (cache / ".writer.lock").symlink_to(victims[0])
    with pytest.raises(CacheError, match="writer lock") as e:
        recompute_statistics(str(cache))
    one_line(e.value)
    assert victims[0].read_text() == "precious"


# ---------------------------------------------------------------------------------------------------------
# Integrity: everything a student reads is checked
# ---------------------------------------------------------------------------------------------------------

PER_SAMPLE = ["samples/ids", "samples/labels", "logits/dense", "features/pooled", "gaussian/mean", "gaussian/std",
              "featmaps/layer3"]
DATASET_LEVEL = ["stats/pca/components", "stats/pca/mean", "stats/cka/ir", "stats/classes/mean",
                 "stats/gaussian/channel_std", "stats/lsh/planes", "stats/lsh/thresholds", "lsh/codes"]


@pytest.mark.parametrize("array", PER_SAMPLE + DATASET_LEVEL)
def test_a_deleted_zarr_chunk_is_found_by_verify_naming_the_array(cache: Path, array: str) -> None:
    first_chunk(cache, array).unlink()  # reads back as zeros
    problems = TeacherCache(cache).verify_integrity()
    assert len(problems) == 1 and array in problems[0], problems


@pytest.mark.parametrize("array", DATASET_LEVEL)
def test_a_deleted_statistics_chunk_is_refused_on_read_and_stats_repairs_it(cache: Path, good: Path,
                                                                            array: str) -> None:
    first_chunk(cache, array).unlink()
    with pytest.raises(CacheError, match=re.escape(array)) as e:
        TeacherCache(cache).read(array)
    assert recommended(one_line(e.value))[0] == "stats"
    assert recompute_statistics(str(cache))
    same_bytes(good, cache)


def test_training_on_deleted_lsh_codes_is_refused(cache: Path) -> None:
    first_chunk(cache, "lsh/codes").unlink()
    with pytest.raises(CacheError, match="lsh/codes"):
        stream_all(cache, frozenset({LSH_CODES}))


def test_training_on_a_deleted_statistics_chunk_is_refused_by_the_cli(cache: Path, tmp_path: Path) -> None:
    first_chunk(cache, "stats/cka/ir").unlink()
    line = cli_error(run_cli("train", "--cache", str(cache), "--student", "test_resnet", "--method", "wkd_l",
                             "--out", str(tmp_path / "run"), "--epochs", "1", "--device", "cpu"))
    assert "stats/cka/ir" in line and not list(tmp_path.rglob("summary.json"))


def flip_a_byte_of_shard_1_and_its_sha256(cache: Path) -> None:
    """A byte of shard 1 flipped and the shard's sha256 in the manifest recomputed: only the damaged block's own
    digest, checked as the stream reads it, can tell."""
    path = cache / "shards" / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    edit_manifest(cache, lambda m: m["shards"][1].update(sha256=sha256_file(path)))


def test_a_flipped_byte_with_recomputed_sha256_is_one_line_on_stream(cache: Path) -> None:
    flip_a_byte_of_shard_1_and_its_sha256(cache)
    with pytest.raises(CacheError, match=r"shard 1: block .* fails its sha256") as e:
        stream_all(cache)
    assert recommended(one_line(e.value))[:3] == ["verify", str(cache), "--repair"]


def test_a_damaged_block_met_by_a_dataloader_worker_is_its_own_one_line_from_train(cache: Path, tmp_path: Path) -> None:
    """A stream worker meets the damaged block: torch re-raises its CacheError with the worker's traceback folded
    into the message, and the CLI prints the original line alone (`pipeline.errors.one_line`)."""
    flip_a_byte_of_shard_1_and_its_sha256(cache)
    line = cli_error(run_cli("train", "--cache", str(cache), "--student", "test_resnet", "--method", "ce", "--out",
                             str(tmp_path / "run"), "--epochs", "1", "--workers", "1", "--device", "cpu"))
    assert re.fullmatch(r"error: shard 1: block .* fails its sha256.*", line), line
    assert "DataLoader worker" not in line and recommended(line)[:3] == ["verify", str(cache), "--repair"]


def test_a_flipped_byte_in_an_older_shard_record_is_one_line_not_a_zip_traceback(cache: Path) -> None:
    """A record without block digests (written before them) and a re-computed sha256: the block's own CRC
    catches the byte when it is decoded, reported as one line naming the shard file and block."""
    path = cache / "shards" / "train-000002.tar"
    with tarfile.open(path) as tar:
        member = tar.getmembers()[0]
    data = bytearray(path.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0x01  # inside the block, not the tar's padding
    path.write_bytes(bytes(data))

    def older(m: dict) -> None:
        for s in m["shards"]:
            s.pop("blocks_sha256"), s.pop("arrays_sha256")
        m["shards"][2]["sha256"] = sha256_file(path)

    edit_manifest(cache, older)
    with pytest.raises(CacheError, match=r"train-000002\.tar: block .* does not decode") as e:
        stream_all(cache)
    one_line(e.value)


@pytest.mark.parametrize("edit, culprit", [
    (lambda m: m["dataset"].update(num_samples=130), "num_samples"),
    (lambda m: m["dataset"].update(num_samples=100), "num_samples"),
    (lambda m: (m["dataset"].update(num_samples=160), m["shards"][2].update(stop=160)), "at most storage.shard_size"),
    (lambda m: m["arrays"]["logits/dense"].update(dtype="float32"), "logits/dense"),
    (lambda m: m["arrays"]["features/pooled"].update(shape=[120, 2, 3]), "features/pooled"),
    (lambda m: m["shards"][1].update(start=45), "shard ranges"),
    (lambda m: m.pop("teacher"), "fields of a cache manifest"),
    (lambda m: m.update(surprise=1), "fields of a cache manifest"),
    (lambda m: m["shards"][0].update(extra="x"), "fields of a cache manifest"),
])
def test_an_edited_manifest_is_refused_by_inspect(cache: Path, edit, culprit: str) -> None:
    edit_manifest(cache, edit)
    with pytest.raises(CacheError, match=re.escape(culprit)) as e:
        TeacherCache(cache, require_complete=False)
    one_line(e.value)


@pytest.mark.parametrize("path, content, culprit", [
    ("manifest.json", b"{not json", "manifest.json"),
    ("manifest.json", b"\xff\xfe garbage", "manifest.json"),
    ("manifest.json", b"[1, 2]", "manifest.json"),
    ("arrays.zarr/logits/dense/zarr.json", b"garbage", "logits/dense"),
    ("arrays.zarr/samples/ids/zarr.json", b'{"zarr_format": 3, "node_type": "array"}', "samples/ids"),
    ("arrays.zarr/stats/cka/ir/zarr.json", b"{}", "stats/cka/ir"),
])
def test_garbage_metadata_is_one_line_naming_the_file(cache: Path, path: str, content: bytes, culprit: str) -> None:
    (cache / path).write_bytes(content)
    with pytest.raises(CacheError, match=re.escape(culprit)) as e:
        TeacherCache(cache, require_complete=False).statistics()
    one_line(e.value)


def test_a_garbage_zarr_group_is_one_line_from_inspect(cache: Path) -> None:
    (cache / "arrays.zarr" / "zarr.json").write_text("garbage")
    assert "arrays.zarr" in cli_error(run_cli("inspect", str(cache)))


def test_a_changed_lsh_index_and_teacher_tail_are_found_by_verify(cache: Path) -> None:
    for name in ("lsh.faiss", "teacher_tail.pt"):
        data = bytearray((cache / name).read_bytes())
        data[-1] ^= 0x01
        (cache / name).write_bytes(bytes(data))
    problems = TeacherCache(cache).verify_integrity()
    assert [p for p in problems if "lsh.faiss" in p] and [p for p in problems if "teacher_tail.pt" in p], problems


def test_an_older_cache_without_digests_still_opens_and_verify_says_so(cache: Path, good: Path) -> None:
    def older(m: dict) -> None:
        m.pop("digests")
        for s in m["shards"]:
            s.pop("blocks_sha256"), s.pop("arrays_sha256")

    edit_manifest(cache, older)
    assert stream_all(cache) == 120
    result = verify_cache(cache, samples=4)
    assert result.ok and len(result.notes) == 1
    note = result.notes[0]
    assert "statistics not digested" in note and "written by an older version" in note
    recompute_statistics(str(cache))  # the command the note recommends
    assert verify_cache(cache, samples=4).notes == []
    assert Manifest.load(cache).digests == Manifest.load(good).digests


# ---------------------------------------------------------------------------------------------------------
# Values: non-finite after the cast to the stored dtype
# ---------------------------------------------------------------------------------------------------------


def test_float16_overflow_of_finite_logits_is_refused_naming_sample_ids(digits_teacher: Path, cache_request,
                                                                        tmp_path: Path) -> None:
    """A teacher whose float32 logits are finite but beyond float16's 65504: refused, the cache partial."""
    ckpt = TeacherCheckpoint.load(digits_teacher)
    loud = tmp_path / "loud.pt"
    replace(ckpt, state_dict={k: v * 1e6 if k.startswith("fc.") else v for k, v in ckpt.state_dict.items()}).save(loud)
    out = tmp_path / "loud-cache"
    with pytest.raises(CacheError, match=r"logits/dense is not finite as float16 for \d+ samples \(ids \[") as e:
        run_cache_pass(cache_request(out, checkpoint=str(loud), subset=40, views=1, shard_size=40))
    assert "65504" in one_line(e.value)
    assert Manifest.load(out).status == "partial" and not list((out / "shards").glob("*.json"))


# ---------------------------------------------------------------------------------------------------------
# Repair: every recommended command works, and gives back the same bytes
# ---------------------------------------------------------------------------------------------------------


def corrupt_shard(root: Path, index: int) -> None:
    path = root / "shards" / f"train-{index:06d}.tar"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_rerunning_the_cache_command_rewrites_a_corrupt_shard(cache: Path, good: Path, request_for) -> None:
    corrupt_shard(cache, 1)
    with pytest.raises(CacheError, match="shard 1") as e:
        open_cache(str(cache))
    assert "re-run the `distillery cache` command" in one_line(e.value)
    run_cache_pass(request_for(cache))
    same_bytes(good, cache)


def test_rerunning_the_cache_command_rewrites_lost_rows_and_statistics(cache: Path, good: Path,
                                                                       request_for) -> None:
    first_chunk(cache, "features/pooled").unlink()
    first_chunk(cache, "stats/pca/components").unlink()
    (cache / "lsh.faiss").unlink()
    run_cache_pass(request_for(cache))
    same_bytes(good, cache)


def test_the_cache_command_rerun_repairs_through_the_prefect_flow(prefect_harness, cache: Path, good: Path,
                                                                   digits_teacher: Path) -> None:
    """The issue's dead end: the `distillery cache` rerun that `train` recommends said "3 shards reused" and
    repaired nothing. Now it re-checks what it reuses and rewrites the damaged shard and statistics."""
    from typer.testing import CliRunner

    from flows.cli import app

    corrupt_shard(cache, 1)
    first_chunk(cache, "stats/cka/ir").unlink()
    result = CliRunner().invoke(app, [
        "cache", "--dataset", "digits", "--teacher", "test_resnet", "--checkpoint", str(digits_teacher),
        "--out", str(cache), "--views", "1", "--subset", "120", "--shard-size", "40", "--featmaps",
        "--teacher-tail", "1", "--lsh-bits", "16", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    # Without a terminal the console is 140 columns wide: a long temporary path wraps the summary line.
    assert "(2 shards reused)" in " ".join(result.output.split())
    same_bytes(good, cache)


def test_verify_repair_as_recommended_by_train_restores_the_same_bytes(cache: Path, good: Path,
                                                                       tmp_path: Path) -> None:
    first_chunk(cache, "gaussian/std").unlink()
    corrupt_shard(cache, 2)
    line = cli_error(run_cli("train", "--cache", str(cache), "--student", "test_resnet", "--method", "ce",
                             "--out", str(tmp_path / "run"), "--epochs", "1", "--device", "cpu"))
    assert "shard 2" in line
    stats_line = cli_error(run_cli("stats", str(cache)))
    assert "gaussian/std" in stats_line and recommended(stats_line)[:3] == ["verify", str(cache), "--repair"]
    repaired = run_cli(*recommended(stats_line), "--samples", "4")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "OK" in repaired.stdout
    same_bytes(good, cache)


def test_verify_repair_refuses_without_the_recorded_checkpoint(cache: Path, tmp_path: Path) -> None:
    corrupt_shard(cache, 0)
    edit_manifest(cache, lambda m: m["teacher"].update(checkpoint=str(tmp_path / "gone.pt")))
    with pytest.raises(TeacherError, match="gone.pt") as e:
        repair_cache(cache)
    one_line(e.value)


def test_verify_repair_refuses_a_changed_checkpoint(cache: Path, tmp_path: Path, digits_teacher: Path) -> None:
    changed = tmp_path / "changed.pt"
    replace(TeacherCheckpoint.load(digits_teacher), val_accuracy=0.0).save(changed)
    edit_manifest(cache, lambda m: m["teacher"].update(checkpoint=str(changed)))
    with pytest.raises(TeacherError, match="changed since the cache was made") as e:
        repair_cache(cache)
    one_line(e.value)


def _killed_stats(root: Path, lsh_bits: int, at_replace: int) -> int:
    """`distillery stats ROOT --lsh-bits N` SIGKILLed at its `at_replace`-th rename of a statistics array
    into place (1: every new array written and staged, none moved yet)."""
    script = f"""
import os, signal, sys
import pipeline.cache.writer as writer
from flows.cli import main

class KillOnReplace:
    calls = 0
    def __getattr__(self, name):
        return getattr(os, name)
    def replace(self, a, b):
        KillOnReplace.calls += 1
        if KillOnReplace.calls == {at_replace}:
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(a, b)

writer.os = KillOnReplace()
sys.argv = ["distillery", "stats", {str(root)!r}, "--lsh-bits", "{lsh_bits}"]
main()
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=600,
                          check=False).returncode


def test_a_stats_run_killed_before_its_commit_leaves_the_previous_cache_usable(cache: Path, good: Path,
                                                                               request_for) -> None:
    assert _killed_stats(cache, 128, at_replace=1) == -signal.SIGKILL
    assert Manifest.load(cache).status == "complete" and Manifest.load(cache).storage.lsh_bits == 16
    assert TeacherCache(cache).verify_integrity() == [] and stream_all(cache, frozenset({LSH_CODES})) == 120
    run_cache_pass(request_for(cache))  # the original command: complete and verified, nothing to do
    same_bytes(good, cache)
    recompute_statistics(str(cache), lsh_bits=128)  # and the killed one, run again
    assert Manifest.load(cache).storage.lsh_bits == 128 and TeacherCache(cache).verify_integrity() == []
    assert not list(cache.glob(".stats-staging-*"))


def test_a_stats_run_killed_inside_its_commit_is_detected_and_stats_repairs_it(cache: Path, good: Path) -> None:
    """Killed between moving the old `stats/lsh/planes` out and the new one in (the arrays are renamed in
    the order written: the others, then planes, thresholds, codes; two renames each)."""
    others = len(Manifest.load(good).stats.arrays) - 3
    assert _killed_stats(cache, 128, at_replace=2 * others + 2) == -signal.SIGKILL
    problems = TeacherCache(cache).statistics_problems()
    assert problems and all("distillery stats" in p for p in problems) and "stats/lsh/planes" in problems[0], problems
    recompute_statistics(str(cache))
    assert TeacherCache(cache).verify_integrity() == []
    same_bytes(good, cache)


def test_two_writers_on_one_cache_the_second_gets_one_line(cache: Path) -> None:
    from pipeline.cache.lock import cache_lock

    with cache_lock(cache):
        line = cli_error(run_cli("stats", str(cache)))
        assert "another distillery process is writing" in line
        with pytest.raises(CacheError, match="another distillery process"):
            recompute_statistics(str(cache))
    assert recompute_statistics(str(cache))  # the lock is released with its holder


def test_one_large_image_does_not_pad_the_others_of_its_shard(cache: Path) -> None:
    """The issue's 2500x2500 image among small ones: raw images are stored flat, each at its own size, so
    the shard grows by that image's bytes, not by its size times every image of the block."""
    c = TeacherCache(cache)
    record = c.manifest.records()[0]
    rows = {name: c.read(name)[record.start:record.stop] for name in c.manifest.arrays}
    shard = cache / record.file
    raws = []
    for _, data in iter_tar_members(shard):
        block = decode_block(data)
        raws += [unpack_raw(block, i) for i in range(raw_count(block))]
    big = np.zeros((2500, 2500, raws[0].shape[2]), np.uint8)
    CacheWriter(cache, c.manifest).write_shard(0, record.start, record.stop, rows, [big, *raws[1:]])
    assert shard.stat().st_size < record.bytes + 2 * big.nbytes  # padded: (block size) x big.nbytes
    blocks = [decode_block(data) for _, data in iter_tar_members(shard)]
    assert np.array_equal(unpack_raw(blocks[0], 0), big) and np.array_equal(unpack_raw(blocks[0], 1), raws[1])
