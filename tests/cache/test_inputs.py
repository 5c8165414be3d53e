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

from pipeline.cache.inputs import InputCodec, StoredImages, raw_count
from pipeline.cache.manifest import CacheError
from pipeline.cache.reader import BlockReader, TeacherCache
from pipeline.cache.source import source_dataset
from pipeline.cache.targets import LOGITS
from pipeline.data.decode import decode_image, decoded_size
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


def caches_on_first_use(folder: Path, tmp_path_factory: pytest.TempPathFactory, modes: dict[str, dict]):
    """mode -> a cache of `folder` made with `modes[mode]` on first use, then shared."""
    made: dict[str, Path] = {}

    def get(mode: str) -> TeacherCache:
        if mode not in made:
            made[mode] = cache_folder(folder, tmp_path_factory.mktemp(mode) / "cache", **modes[mode])
        return TeacherCache(made[mode])

    return get


@pytest.fixture(scope="module")
def caches(folder: Path, tmp_path_factory: pytest.TempPathFactory):
    """mode -> a cache of `folder` in that mode, made on first use and shared by the module's tests."""
    return caches_on_first_use(folder, tmp_path_factory, MODES)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_student_renders_are_the_teacher_renders_bit_for_bit_and_verify_passes(caches, mode) -> None:
    assert_student_sees_the_teacher_renders(caches(mode))


def assert_student_sees_the_teacher_renders(cache: TeacherCache) -> None:
    """Every (id, view) the student stream renders equals the teacher pass's render, bit for bit; verify passes."""
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


def copy_with_storage(cache: TeacherCache, tmp_path: Path, field: str, value: object) -> Path:
    """A copy of `cache` whose manifest's `storage.<field>` says `value`."""
    root = shutil.copytree(cache.root, tmp_path / "cache")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["storage"][field] = value
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def assert_stream_refused(root: Path, pattern: str) -> None:
    """Opening a student stream on the cache at `root` is refused with one line matching `pattern`."""
    with pytest.raises(CacheError, match=pattern) as caught:
        CacheStream(TeacherCache(root), size=16, targets=frozenset(), seed=0)
    assert "\n" not in str(caught.value)


def test_another_decoder_is_refused_in_one_line(caches, tmp_path) -> None:
    root = copy_with_storage(caches("encoded"), tmp_path, "decoder",
                             "pillow 9.0.0; libjpeg 8.0; zlib 1.2.11; webp 1.2.0")
    assert_stream_refused(root, r"decoded with pillow 9\.0\.0.*this machine decodes with pillow "
                                r".*the pixels could differ")


@pytest.mark.parametrize("forged", ["float16", 8])
def test_new_caches_resize_in_uint8_and_a_forged_resize_is_refused_in_one_line(caches, tmp_path, forged) -> None:
    # Every cache of MODES is new, so their student == teacher renders above are uint8-resize renders.
    assert caches("raw").manifest.views.resize == "uint8" and caches("raw").manifest.views.recipe.endswith("+uint8")
    root = shutil.copytree(caches("raw").root, tmp_path / "cache")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["views"]["resize"] = forged
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"manifest\.json: field views\.resize has the wrong type") as caught:
        TeacherCache(root)
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


@pytest.fixture(scope="module")
def large_caches(tmp_path_factory: pytest.TempPathFactory):
    """mode -> a cache of a folder of ~130x170 images (at input size 16 the views need 32 px a side: decoded at
    1/4 scale), made on first use."""
    folder = write_folder(tmp_path_factory.mktemp("large"), per_class=3, val=1, size=(130, 170))
    return caches_on_first_use(folder, tmp_path_factory, LARGE_MODES)


LARGE_MODES = {"raw": {"inputs": "raw"}, "encoded": {"inputs": "encoded"}, "full": {"reduced_decode": False},
               "raw-10kB-shards": {"inputs": "raw", "shard_bytes": 10_000}}


def stored_shapes(cache: TeacherCache) -> list[tuple[int, int]]:
    """(H, W) of every sample's input as the student stream decodes it, in stored order."""
    reader = BlockReader(cache, frozenset())
    return [block.image(i).shape[:2] for shard in range(len(cache.manifest.shards))
            for block in reader.blocks(shard) for i in range(raw_count(block.raw))]


def file_shapes(cache: TeacherCache) -> list[tuple[int, int]]:
    """(H, W) of every sample's file, in stored order (its header only)."""
    dataset = source_dataset(cache)
    shapes = []
    for path in dataset.paths:
        with Image.open(path) as image:
            shapes.append((image.height, image.width))
    return shapes


@pytest.mark.parametrize("mode", ["raw", "encoded"])
def test_files_decode_reduced_to_what_the_views_need_and_student_and_teacher_see_the_same_bits(
        large_caches, mode) -> None:
    cache = large_caches(mode)
    assert cache.manifest.storage.decode_min_side == ViewPlan(num_augmented=1).source_side(16) == 32
    assert stored_shapes(cache) == [(-(-h // 4), -(-w // 4)) for h, w in file_shapes(cache)]
    assert_student_sees_the_teacher_renders(cache)
    assert build_manifest(manifest_request(cache.root)).identity() == cache.manifest.identity()


def test_a_cache_without_the_decode_rule_decodes_at_full_size_as_before(large_caches) -> None:
    """What a cache made before `decode_min_side` holds (no key: the identity it had) is read as it was."""
    cache = large_caches("full")
    assert "decode_min_side" not in json.loads((cache.root / "manifest.json").read_text())["storage"]
    assert stored_shapes(cache) == file_shapes(cache)
    assert_student_sees_the_teacher_renders(cache)
    assert build_manifest(manifest_request(cache.root)).identity() == cache.manifest.identity()


def test_the_same_command_reuses_a_cache_made_before_the_decode_rule(large_caches, tmp_path) -> None:
    """`reduced_decode` left to auto follows the cache already at --out: rerunning the command that made a
    full-size cache reuses it (no shard rewritten), where a new --out gets the reduced decode."""
    cache = large_caches("full")
    root = shutil.copytree(cache.root, tmp_path / "cache")
    teacher = cache.root.parent / f"{cache.root.name}-teacher.pt"
    request = CacheRequest(**{**manifest_request(cache.root).model_dump(), "out": str(root), "reduced_decode": None,
                              "checkpoint": str(teacher)})
    assert build_manifest(request).identity() == cache.manifest.identity()
    assert run_cache_pass(request).written_shards == 0
    fresh = build_manifest(request.model_copy(update={"out": str(tmp_path / "new")}))
    assert fresh.storage.decode_min_side == 32


def test_shards_are_cut_by_bytes_as_well_as_by_count(large_caches) -> None:
    """Raw inputs of at most 34 x 42 x 3 = 4,284 bytes (the largest file, 136 x 166, decoded at 1/4): two fit in
    10 kB, and the shards of --shard-size 6 hold two samples each; the default budget leaves them at 6."""
    cache = large_caches("raw-10kB-shards")
    assert max(h * w * 3 for h, w in stored_shapes(cache)) == 34 * 42 * 3
    assert cache.manifest.storage.shard_size == 2
    assert [s.count for s in cache.manifest.shards] == [2, 2, 2]
    assert_student_sees_the_teacher_renders(cache)
    assert build_manifest(manifest_request(cache.root)).identity() == cache.manifest.identity()
    assert [s.count for s in large_caches("raw").manifest.shards] == [6]


@pytest.mark.parametrize("forged", [8, 64, 0])
def test_a_forged_decode_rule_is_refused_in_one_line(large_caches, tmp_path, forged) -> None:
    root = copy_with_storage(large_caches("encoded"), tmp_path, "decode_min_side", forged)
    assert_stream_refused(root, rf"storage\.decode_min_side is {forged}, and this cache's views at input size 16 "
                                r"need 32 px a side: its inputs would decode to other pixels")


def test_a_reduced_decode_divides_by_the_largest_dct_scale_that_keeps_min_side(tmp_path) -> None:
    pixels = smooth_noise(np.random.default_rng(2), 301, 403)
    Image.fromarray(pixels).save(tmp_path / "p.jpg", quality=90)
    Image.fromarray(pixels).save(tmp_path / "p.png")
    assert decoded_size(403, 301, None, 38) == (51, 38)  # 1/8, rounded up as the DCT scaling rounds
    assert decoded_size(403, 301, None, 39) == (101, 76)  # 1/4
    assert decoded_size(403, 301, None, 302) == decoded_size(403, 301, None, None) == (403, 301)
    assert decoded_size(403, 301, 200, 40) == (100, 75)  # --max-side first (200 x 149), then 1/2
    data = (tmp_path / "p.jpg").read_bytes()
    with Image.open(tmp_path / "p.jpg") as image:  # the JPEG decoder's own 1/4 scale: no resize after it
        image.draft("RGB", (100, 75))
        np.testing.assert_array_equal(decode_image(data, 3, None, 39), np.asarray(image.convert("RGB")))
    assert decode_image(tmp_path / "p.png", 3, None, 39).shape == (76, 101, 3)  # not a JPEG: resized in uint8
    assert decode_image(data, 3, 200, 40).shape == (75, 100, 3)
    assert decode_image(data, 1, None, 38).shape == (38, 51, 1)


PHOTO_RUN = """
import sys
from pipeline.teacher.cache_pass import run_cache_pass
from pipeline.teacher.plan import CacheRequest
from pipeline.train.config import RunSettings, TrainConfig
from pipeline.train.loop import train_student
folder, out = sys.argv[1], sys.argv[2]
run_cache_pass(CacheRequest(dataset=f"imagefolder:{folder}", teacher="test_resnet", out=out + "/cache", views=1,
                            tap="none", input_size=32, device="cpu"))
train_student(TrainConfig(cache=out + "/cache", student="test_resnet", methods=("ce", "kd"), out=out + "/run",
                          settings=RunSettings(epochs=1, batch_size=4, workers=0, device="cpu")))
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print("VmPeak", status["VmPeak"].strip(), "VmHWM", status["VmHWM"].strip())
"""
PHOTO_LIMIT = 5 << 30
"""Address space of the run below, without --max-side. Measured on the 2-core machine (shared, load ~15) with
these 8 train photos (docs/results.md#inputs): this code peaks at 4.46 GiB (RSS 0.81 GiB; the same folder at
400x300: 4.44 GiB, 0.78 GiB); the code before the reduced decode peaked at 5.79 GiB (RSS 2.63 GiB), its
clean views rendered from full-resolution float32."""


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
