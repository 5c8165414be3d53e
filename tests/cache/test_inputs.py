"""A cache's inputs stored raw, encoded or as source references (pipeline.cache.inputs): the student stream
renders bit for bit what the teacher pass rendered, verify passes, and what is read is checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
from PIL import Image

from pipeline.cache.inputs import InputCodec, StoredImages
from pipeline.cache.manifest import CacheError
from pipeline.cache.reader import BlockReader, TeacherCache
from pipeline.cache.source import source_dataset
from pipeline.cache.targets import LOGITS
from pipeline.data.decode import decode_image
from pipeline.data.imagefolder import CHECKS_ENV
from pipeline.data.views import ViewPlan
from pipeline.teacher.cache_pass import run_cache_pass
from pipeline.teacher.checkpoint import TeacherCheckpoint
from pipeline.teacher.forward import render_pairs
from pipeline.teacher.model import manifest_teacher_spec
from pipeline.teacher.plan import CacheRequest, build_manifest
from pipeline.teacher.verify import manifest_request, verify_cache
from pipeline.train.config import RunSettings, TrainConfig
from pipeline.train.loop import train_student
from pipeline.train.stream import CacheStream

from tests.conftest import TINY_TEACHER


def smooth_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 RGB noise upsampled from a coarse grid: photo-like, so JPEG compresses it as it does photos."""
    coarse = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))


def write_folder(root: Path, per_class: int = 5, val: int = 2, size: tuple[int, int] = (40, 52)) -> Path:
    """train/ and val/ of two classes: JPEGs of varied sizes, and one PNG per split."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", val)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = smooth_noise(rng, size[0] + 3 * i, size[1] - 2 * i)
                suffix = "png" if (cls, i) == ("b", 0) else "jpg"
                Image.fromarray(pixels).save(root / split / cls / f"{i}.{suffix}", quality=85)
    return root


def random_teacher(path: Path) -> Path:
    """An untrained teacher saved as a checkpoint: `verify` rebuilds a cache's teacher from its file."""
    model = timm.create_model(TINY_TEACHER, num_classes=2, in_chans=3)
    TeacherCheckpoint(model=TINY_TEACHER, state_dict=model.state_dict(), num_classes=2, in_chans=3, input_size=16,
                      mean=(0.5,) * 3, std=(0.25,) * 3, dataset="photos", val_accuracy=None, config={}).save(path)
    return path


def cache_folder(folder: Path, out: Path, **options) -> Path:
    teacher = random_teacher(out.parent / f"{out.name}-teacher.pt")
    run_cache_pass(CacheRequest(dataset=f"imagefolder:{folder}", teacher=TINY_TEACHER, checkpoint=str(teacher),
                                out=str(out), views=1, tap="none", shard_size=6, block_size=4, batch_size=8,
                                device="cpu", **options))
    return out


def student_inputs(cache: TeacherCache, size: int) -> dict[tuple[int, int], np.ndarray]:
    """(id, view) -> the student stream's rendered input, over one epoch."""
    stream = CacheStream(cache, size=size, targets=frozenset({LOGITS}), seed=0, shuffle_buffer=0)
    out = {}
    for batch in stream.loader(0, batch_size=4, workers=0):
        for i in range(len(batch["id"])):
            out[int(batch["id"][i]), int(batch["view"][i])] = batch["input"][i].numpy()
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("photos"))


MODES = {"raw": {"inputs": "raw"}, "encoded": {},  # auto: encoded for a folder
         "encoded-max-side": {"inputs": "encoded:quality=80", "max_side": 24},
         "source-max-side": {"inputs": "source", "max_side": 20}}


@pytest.fixture(scope="module")
def caches(folder: Path, tmp_path_factory: pytest.TempPathFactory):
    """mode -> a cache of `folder` in that mode, made on first use and shared by the module's tests."""
    made: dict[str, Path] = {}

    def get(mode: str) -> TeacherCache:
        if mode not in made:
            made[mode] = cache_folder(folder, tmp_path_factory.mktemp(mode) / "cache", **MODES[mode])
        return TeacherCache(made[mode])

    return get


@pytest.mark.parametrize("mode", sorted(MODES))
def test_student_renders_are_the_teacher_renders_bit_for_bit_and_verify_passes(caches, mode) -> None:
    cache = caches(mode)
    m = cache.manifest
    seen = student_inputs(cache, m.teacher.input_size)
    dataset = source_dataset(cache)
    assert sorted(sample for sample, _ in seen) == sorted(dataset.ids.tolist())
    position = {int(sample): p for p, sample in enumerate(dataset.ids)}
    pairs = np.array([(position[sample], view) for sample, view in seen], dtype=np.int64)
    # The teacher pass's own render: the stored inputs read back (`StoredImages`), through `render_pairs`.
    teacher = render_pairs(StoredImages.of(dataset, InputCodec.of(m)), ViewPlan(**m.views.plan_fields()), pairs,
                           manifest_teacher_spec(m.teacher)).numpy()
    for key, rendered in zip(seen, teacher):
        np.testing.assert_array_equal(seen[key], rendered)
    result = verify_cache(cache.root, samples=8)
    assert result.ok, (result.problems, result.checks)


@pytest.mark.parametrize("mode", ["raw", "encoded-max-side"])
def test_the_request_read_back_from_the_manifest_has_the_caches_identity(caches, mode) -> None:
    """What `verify --repair` re-runs: the same inputs, max side and decoder."""
    cache = caches(mode)
    assert build_manifest(manifest_request(cache.root)).identity() == cache.manifest.identity()


def stored_input_bytes(cache: TeacherCache) -> int:
    reader = BlockReader(cache, frozenset())
    return sum(sum(a.nbytes for a in block.raw.values())
               for shard in range(len(cache.manifest.shards)) for block in reader.blocks(shard))


def test_encoded_inputs_are_the_files_own_bytes_and_max_side_shrinks_them(folder, caches) -> None:
    files = sorted((folder / "train").rglob("*.*"))
    cache = caches("encoded")
    assert cache.manifest.storage.inputs == "encoded" and cache.manifest.storage.decoder
    offsets = (len(files) + 3) * 8  # encoded_offsets: n + 1 int64 per block (blocks of 4, 2 and 4)
    assert stored_input_bytes(cache) == sum(f.stat().st_size for f in files) + offsets
    raw = caches("raw")
    assert raw.manifest.storage.to_dict().keys().isdisjoint({"inputs", "decoder", "max_side"})  # the old identity
    assert stored_input_bytes(raw) > 4 * stored_input_bytes(cache)
    small = caches("encoded-max-side")
    assert small.manifest.storage.max_side == 24
    reader = BlockReader(small, frozenset())
    block = next(reader.blocks(0))
    assert max(block.image(0).shape[:2]) == 24


def test_a_changed_source_file_is_refused_naming_it(folder, tmp_path) -> None:
    copy = shutil.copytree(folder, tmp_path / "copy")
    cache = TeacherCache(cache_folder(copy, tmp_path / "cache", inputs="source"))
    changed = copy / "train" / "a" / "1.jpg"
    changed.write_bytes(changed.read_bytes()[:-10])
    with pytest.raises(CacheError, match=rf"{changed} is missing or changed since the cache was written"):
        student_inputs(cache, 16)


def test_another_decoder_is_refused_in_one_line(caches, tmp_path) -> None:
    root = shutil.copytree(caches("encoded").root, tmp_path / "cache")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["storage"]["decoder"] = "pillow 9.0.0; libjpeg 8.0; zlib 1.2.11; webp 1.2.0"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"decoded with pillow 9\.0\.0.*this machine decodes with pillow "
                                         r".*the pixels could differ") as caught:
        CacheStream(TeacherCache(root), size=16, targets=frozenset(), seed=0)
    assert "\n" not in str(caught.value)


def test_a_max_side_decode_shrinks_in_the_jpeg_decoder_to_the_exact_size(tmp_path) -> None:
    pixels = smooth_noise(np.random.default_rng(1), 300, 400)
    Image.fromarray(pixels).save(tmp_path / "p.jpg", quality=90)
    data = (tmp_path / "p.jpg").read_bytes()
    assert decode_image(data, 3, 100).shape == (75, 100, 3)
    assert decode_image(data).shape == (300, 400, 3)
    np.testing.assert_array_equal(decode_image(data, 3, 100), decode_image(tmp_path / "p.jpg", 3, 100))


_OPENED: list[str] | None = None  # while a list: the paths this process opens (an audit hook cannot be removed)


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None and isinstance(args[0], (str, Path)):
        _OPENED.append(str(args[0]))


sys.addaudithook(_record_opens)


def test_train_from_a_cache_opens_no_training_image_and_checks_val_once(folder, tmp_path, monkeypatch) -> None:
    """Encoded inputs (raw ones are read from the cache the same way, by the same stream). Each `train` of a
    sweep opens the val images to evaluate; only the first checks them (remembered per file)."""
    global _OPENED
    monkeypatch.setenv(CHECKS_ENV, str(tmp_path / "checks"))  # not there yet: the first check creates it
    copy = shutil.copytree(folder, tmp_path / "photos")
    cache = cache_folder(copy, tmp_path / "cache")
    away = tmp_path / "away"
    away.mkdir()
    for path in (copy / "train").rglob("*.*"):  # the class folders stay: they name the classes
        shutil.move(path, away / f"{path.parent.name}-{path.name}")
    val = sorted(str(p) for p in (copy / "val").rglob("*.*"))
    opens = []
    for run in ("first", "second"):
        _OPENED = []
        try:
            summary = train_student(TrainConfig(cache=str(cache), student=TINY_TEACHER, methods=("ce", "kd"),
                                                out=str(tmp_path / run),
                                                settings=RunSettings(epochs=1, batch_size=5, workers=0, device="cpu")))
        finally:
            opens.append(_OPENED)
            _OPENED = None
        assert summary.steps == 2 and 0 <= summary.val_accuracy <= 1
    first, second = ([path for path in run if path in val] for run in opens)
    assert sorted(set(second)) == val and len(first) - len(second) == len(val)  # the check, first run only
    assert not any(str(copy / "train") in path for run in opens for path in run)


PHOTO_RUN = """
import sys
from pipeline.teacher.cache_pass import run_cache_pass
from pipeline.teacher.plan import CacheRequest
from pipeline.train.config import RunSettings, TrainConfig
from pipeline.train.loop import train_student
folder, out = sys.argv[1], sys.argv[2]
run_cache_pass(CacheRequest(dataset=f"imagefolder:{folder}", teacher="test_resnet", out=out + "/cache", views=1,
                            tap="none", input_size=32, device="cpu", max_side=256))
train_student(TrainConfig(cache=out + "/cache", student="test_resnet", methods=("ce", "kd"), out=out + "/run",
                          settings=RunSettings(epochs=1, batch_size=4, workers=0, device="cpu")))
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print("VmPeak", status["VmPeak"].strip(), "VmHWM", status["VmHWM"].strip())
"""
PHOTO_LIMIT = 5 << 30
"""Address space of the run below. Measured on the 2-core machine with these 8 train photos (docs/results.md#inputs):
this code peaks at ~4.7 GB; the code before --max-side failed here (1.07 GiB of float32 for one render batch at
full resolution; it peaked at 5.5 GB with 4 photos)."""


@pytest.mark.slow
def test_camera_photos_cache_and_train_within_an_address_space_limit(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 1)):
        for cls in ("a", "b"):
            (tmp_path / "photos" / split / cls).mkdir(parents=True)
            for i in range(count):  # 12 MP, smooth so they compress as photos do (~1.5 MB each)
                coarse = rng.integers(0, 256, size=(94, 125, 3), dtype=np.uint8)
                Image.fromarray(coarse).resize((4000, 3000), Image.Resampling.BILINEAR).save(
                    tmp_path / "photos" / split / cls / f"{i}.jpg", quality=85)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "2",
           "MALLOC_ARENA_MAX": "2"}  # thread counts and malloc arenas grow the address space with the cores
    run = subprocess.run(["prlimit", f"--as={PHOTO_LIMIT}", sys.executable, "-c", PHOTO_RUN,
                          str(tmp_path / "photos"), str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "run" / "summary.json").is_file()
    print(run.stdout.strip().splitlines()[-1])
