"""`--dataset wds:TRAIN|VAL`: webdataset shards on disk and on S3 (moto server) cache like the same images in an
image folder; what a shard may hold and the one-line refusals of what it may not (issue 28)."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import struct
import tarfile
import urllib.parse
import urllib.request
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cache.reader import TeacherCache
from pipeline.data.datasets import DatasetError, load_dataset
from pipeline.data.imagefolder import CHECKS_ENV
from pipeline.data.webdataset_source import _open, expand_braces, list_shard, sample_id
from pipeline.teacher.cache_pass import run_cache_pass
from pipeline.teacher.plan import CacheRequest
from pipeline.train.config import RunSettings, TrainConfig
from pipeline.train.fit import FitConfig, fit_teacher
from pipeline.train.loop import train_student

FIXTURE = Path(__file__).resolve().parents[2] / "data" / "digits-imagefolder"
CLASSES = ["one", "two", "zero"]  # the fixture's class folders, sorted as an image folder sorts them


def member(name: str, data: bytes, **fields) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def fixture_samples(split: str) -> list[tuple[str, bytes, int]]:
    """(key, PNG bytes, class index) of the fixture's `split`, in the order an image folder stores them."""
    return [(f"{name}_{path.stem}", path.read_bytes(), index) for index, name in enumerate(CLASSES)
            for path in sorted((FIXTURE / split / name).glob("*.png"))]


def sample_members(samples: list[tuple[str, bytes, int]], extension: str = "png") -> list:
    return [m for key, data, label in samples
            for m in (member(f"{key}.{extension}", data), member(f"{key}.cls", str(label).encode()),
                      member(f"{key}.json", b'{"source": "fixture"}'))]  # metadata members are passed over


def fixture_shards(root: Path) -> Path:
    """The fixture as webdataset shards: train in two shards (18 samples each), val in one, and classes.txt."""
    root.mkdir(parents=True)
    train = fixture_samples("train")
    write_tar(root / "train-0000.tar", sample_members(train[:18]))
    write_tar(root / "train-0001.tar", sample_members(train[18:]))
    write_tar(root / "val-0000.tar", sample_members(fixture_samples("val")))
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def jpeg(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def claimed_png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height`` (its IHDR checksum made to match)."""
    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, "PNG")
    data = bytearray(out.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def one_split_shards(root: Path, train: list) -> str:
    """A dataset whose train shard holds `train` (members) and whose val shard one good sample."""
    root.mkdir(parents=True)
    write_tar(root / "train-0000.tar", train)
    write_tar(root / "val-0000.tar", [member("v.jpg", jpeg(1)), member("v.cls", b"0")])
    (root / "classes.txt").write_text("a\nb\n")
    return f"wds:{root}"


def test_brace_expansion_and_the_spec_forms(tmp_path: Path) -> None:
    assert expand_braces("s3://b/train-{0008..0011}.tar") == [f"s3://b/train-{n:04d}.tar" for n in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    with pytest.raises(DatasetError, match=r"\{0..\} in .* is neither a range"):
        expand_braces("train-{0..}.tar")
    root = fixture_shards(tmp_path / "wds")
    by_dir = load_dataset(f"wds:{root}", "val")
    by_patterns = load_dataset(f"wds:{root}/train-{{0000..0001}}.tar|{root}/val-*.tar", "val")
    assert by_dir.name == f"wds:{root}" and by_patterns.name == f"wds:{root}/train-{{0000..0001}}.tar|{root}/val-*.tar"
    assert by_dir.ids.tolist() == by_patterns.ids.tolist() == [sample_id("val", "val-0000.tar", k)
                                                                 for k, _, _ in fixture_samples("val")]
    with pytest.raises(DatasetError, match=r"names the shards of one split only; add the val shards"):
        load_dataset(f"wds:{root}/train-0000.tar")
    (root / "classes.txt").unlink()
    with pytest.raises(DatasetError, match=r"no .*classes.txt; put classes.txt \(one class name per line"):
        load_dataset(f"wds:{root}")


@pytest.mark.slow  # a teacher fit, three cache passes and a student
def test_wds_on_disk_and_on_s3_caches_and_trains_like_the_image_folder(tmp_path: Path, s3_endpoint) -> None:
    root = fixture_shards(tmp_path / "wds")
    for path in root.iterdir():
        s3_endpoint.client.upload_file(str(path), s3_endpoint.bucket, f"wds/{path.name}")
    url = f"s3://{s3_endpoint.bucket}/wds"
    assert load_dataset(f"wds:{url}", "val").ids.tolist() == load_dataset(f"wds:{root}", "val").ids.tolist()
    checkpoint = tmp_path / "teacher.pt"
    fit_teacher(FitConfig(dataset=f"wds:{root}", model="test_resnet", out=str(checkpoint), epochs=1, input_size=16,
                          batch_size=18, workers=0, device="cpu"))
    caches = {}
    for kind, spec in {"folder": f"imagefolder:{FIXTURE}", "local": f"wds:{root}",
                       "s3": f"wds:{url}/train-{{0000..0001}}.tar|{url}/val-0000.tar"}.items():
        run_cache_pass(CacheRequest(dataset=spec, teacher="test_resnet", checkpoint=str(checkpoint),
                                    out=str(tmp_path / kind), views=2, shard_size=18, batch_size=18, block_size=9,
                                    device="cpu"))
        caches[kind] = TeacherCache(tmp_path / kind)
    folder, local, s3 = caches["folder"], caches["local"], caches["s3"]
    assert local.class_names == s3.class_names == folder.class_names == CLASSES
    for cache in (local, s3):
        assert cache.manifest.status == "complete"
        assert cache.manifest.storage.inputs == "encoded"  # as a folder's: the members' own bytes, by default
        np.testing.assert_array_equal(cache.read("samples/labels"), folder.read("samples/labels"))
        np.testing.assert_array_equal(cache.read("samples/ids"), [sample_id("train", f"train-000{i // 18}.tar", k)
                                                                 for i, (k, _, _) in enumerate(fixture_samples("train"))])
        # View 0 is the clean view, a function of the pixels alone: the teacher saw the same images.
        np.testing.assert_array_equal(cache.read("logits/dense")[:, 0], folder.read("logits/dense")[:, 0])
    np.testing.assert_array_equal(s3.read("logits/dense"), local.read("logits/dense"))  # same ids: same views

    summary = train_student(TrainConfig(cache=str(tmp_path / "s3"), student="test_resnet", methods=("ce", "kd"),
                                        out=str(tmp_path / "run"),
                                        settings=RunSettings(epochs=1, batch_size=18, workers=0, device="cpu")))
    assert summary.steps == 2 and 0 <= summary.val_accuracy <= 1  # 36 samples, batches of 18


def test_bad_samples_are_refused_from_the_cli_in_one_line(tmp_path: Path, cli) -> None:
    good = [member("a.jpg", jpeg()), member("a.cls", b"1")]
    cases = {
        "corrupt": (good + [member("b.jpg", jpeg()[:300] + b"\x00" * 200), member("b.cls", b"0")],
                    r"1 train image\(s\) do not decode: \S+/train-0000.tar/b \(.*\); fix or rebuild the shard, or pass "
                    r"--on-bad-image skip"),
        "classless": (good + [member("dir/b.jpg", jpeg())],
                      r"shard \S+/train-0000.tar sample dir/b: an image without a class \(no .cls member\)"),
        "out-of-range": (good + [member("b.jpg", jpeg()), member("b.cls", b"2")],
                         r"shard \S+/train-0000.tar sample b: class index 2 is outside \[0, 2\) \(classes.txt names 2"),
    }
    for name, (members, message) in cases.items():
        spec = one_split_shards(tmp_path / name, members)
        code, out = cli("fit-teacher", "--dataset", spec, "--model", "test_resnet", "--out",
                        str(tmp_path / f"{name}.pt"), "--device", "cpu")
        assert code == 2 and out.count("\n") == 1, out
        assert out.startswith("error: ") and re.search(message, out), out
    skipped = load_dataset(one_split_shards(tmp_path / "skip", cases["corrupt"][0]), on_bad_image="skip")
    assert skipped.keys.tolist() == ["a"] and skipped.skipped[0].startswith(f"{tmp_path}/skip/train-0000.tar/b (")


@pytest.mark.parametrize("members, message", [
    ([member("../up.jpg", b"x")], r"member '../up.jpg' points outside the shard"),
    ([member("/abs.jpg", b"x")], r"member '/abs.jpg' points outside the shard"),
    ([member("l.jpg", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd")], r"member 'l.jpg' is a link"),
    ([member("h.jpg", b"", type=tarfile.LNKTYPE, linkname="a.jpg")], r"member 'h.jpg' is a link"),
    ([member("f.jpg", b"", type=tarfile.FIFOTYPE)], r"member 'f.jpg' is a sparse or special file"),
    ([member("big.cls", b"0" * 40)], r"sample big: its .cls member is 40 bytes, more than the 32"),
    ([member("a.jpg", b"x"), member("a.png", b"y")], r"sample a: two image members"),
    ([member("a.cls", b"cat")], r"sample a: its .cls member holds 'cat', not a class index"),
    ([member("a.cls", b"0")], r"sample a: a .cls member without an image"),
    ([member("a.jpg", jpeg()), member("a.cls", b"-1")], r"sample a: class index -1 is outside \[0, 2\)"),
])
def test_what_a_shard_may_not_hold(tmp_path: Path, members: list, message: str) -> None:
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset(one_split_shards(tmp_path / "d", members))
    assert "\n" not in str(info.value) and "train-0000.tar" in str(info.value)


def test_compressed_bombs_huge_images_and_changed_shards_are_refused(tmp_path: Path) -> None:
    spec = one_split_shards(tmp_path / "gz", [])
    plain = write_tar(tmp_path / "plain.tar", [member("a.jpg", jpeg()), member("a.cls", b"0")]).read_bytes()
    (tmp_path / "gz" / "train-0000.tar").write_bytes(gzip.compress(plain))
    with pytest.raises(DatasetError, match=r"shard \S+/gz/train-0000.tar is not an uncompressed tar"):
        load_dataset(spec)

    spec = one_split_shards(tmp_path / "huge", [member("a.png", claimed_png(9000, 8000)), member("a.cls", b"0")])
    with pytest.raises(DatasetError, match=r"train-0000.tar/a \(9000x8000 pixels, more than the 67,108,864"):
        load_dataset(spec)

    spec = one_split_shards(tmp_path / "changed", [member("a.jpg", jpeg()), member("a.cls", b"0")])
    dataset = load_dataset(spec, "val")
    write_tar(tmp_path / "changed" / "val-0000.tar", [member("v.jpg", jpeg(2)), member("v.cls", b"0")])
    with pytest.raises(DatasetError, match=r"val-0000.tar changed since it was listed"):
        dataset.raw(0)
    assert load_dataset(spec, "val").raw(0).shape == (24, 24, 3)  # listed again: the new bytes


def test_a_pipe_pattern_is_a_local_path_and_runs_nothing(tmp_path: Path) -> None:
    # webdataset's own readers would run `pipe:` URLs in a shell; here only fsspec protocols (`://`) are URLs.
    marker = tmp_path / "ran"
    with pytest.raises(DatasetError) as refused:
        load_dataset(f"wds:pipe:touch {marker}|pipe:touch {marker}", "train")
    assert "\n" not in str(refused.value) and not marker.exists()


def shard_bytes_read(endpoint: str, sizes: dict[str, int]) -> dict[str, int]:
    """Bytes of each object in `sizes` that GET requests since the last reset of moto's request recorder fetched
    (a ranged GET counts its range, clipped to the object as the server clips it)."""
    with urllib.request.urlopen(f"{endpoint}/moto-api/recorder/download-recording") as response:
        requests = [json.loads(line) for line in response.read().decode().splitlines() if line]
    read = dict.fromkeys(sizes, 0)
    for request in requests:
        key = urllib.parse.urlparse(request["url"]).path.rsplit("/", 1)[-1]
        if request["method"] != "GET" or key not in sizes:
            continue
        first, last = 0, sizes[key] - 1
        if "Range" in request["headers"]:
            low, high = re.fullmatch(r"bytes=(\d+)-(\d*)", request["headers"]["Range"]).groups()
            first, last = int(low), min(last, int(high) if high else last)
        read[key] += max(0, last - first + 1)
    return read


def test_s3_shards_are_listed_once_and_read_once_per_pass(tmp_path: Path, s3_endpoint, monkeypatch) -> None:
    root = fixture_shards(tmp_path / "wds")
    for path in root.iterdir():
        s3_endpoint.client.upload_file(str(path), s3_endpoint.bucket, f"wds/{path.name}")
    sizes = {path.name: path.stat().st_size for path in root.glob("*.tar")}
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.chdir(tmp_path)  # moto's recorder appends every request to ./moto_recording
    monkeypatch.setenv(CHECKS_ENV, str(tmp_path / "checks"))  # a folder that is not there yet

    def recorder(action: str) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/recorder/{action}", method="POST")).close()

    def command(listed: tuple[str, ...], read: str) -> dict[str, int]:
        """What a fresh process fetches that loads the splits `listed`, then reads every sample of `read` once."""
        list_shard.cache_clear()
        _open.handles = OrderedDict()  # and opens shards of its own
        recorder("reset-recording")
        datasets = {split: load_dataset(f"wds:s3://{s3_endpoint.bucket}/wds", split) for split in listed}
        dataset = datasets[read]
        assert [len(dataset.encoded(p)) for p in range(len(dataset))] == dataset.sizes.tolist()
        return shard_bytes_read(endpoint, sizes)

    recorder("start-recording")
    try:
        fit = command(("train", "val"), "train")  # `fit-teacher`: both splits listed, then its pass
        cache = command(("train",), "train")  # `cache`: the teacher pass
        train = command(("val",), "val")  # `train` of a student: its evaluation
    finally:
        recorder("stop-recording")
    # Listing reads a shard front to back; a pass reads it from its first image (after that member's 512-byte
    # tar header) to the end through fsspec's read-ahead (these shards are smaller than its block: one GET).
    passed = {name: size - 512 for name, size in sizes.items()}
    none = dict.fromkeys(sizes, 0)
    assert fit == {name: sizes[name] + (passed[name] if name.startswith("train") else 0) for name in sizes}
    assert cache == {**none, "train-0000.tar": passed["train-0000.tar"], "train-0001.tar": passed["train-0001.tar"]}
    assert train == {**none, "val-0000.tar": passed["val-0000.tar"]}
    assert len(list((tmp_path / "checks" / "wds").glob("*.json"))) == 3


def test_a_remembered_listing_is_trusted_only_for_what_the_shard_could_hold(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(CHECKS_ENV, str(tmp_path / "checks"))
    spec = f"wds:{fixture_shards(tmp_path / 'wds')}"
    listed = load_dataset(spec, "val")
    record_path, = (tmp_path / "checks" / "wds").glob("*.json")
    record = json.loads(record_path.read_text())
    shard_size = (tmp_path / "wds" / "val-0000.tar").stat().st_size
    forgeries = {"past the end": {"offsets": [shard_size] + record["offsets"][1:]},
                 "too big": {"sizes": [64 * 2 ** 20 + 1] + record["sizes"][1:]},
                 "a row short": {"labels": record["labels"][1:]},
                 "not a listing": {"keys": "abc"},
                 "a key no error line could print": {"keys": ["a\nb"] + record["keys"][1:]}}
    for why, fields in forgeries.items():
        record_path.write_text(json.dumps({**record, **fields}))
        list_shard.cache_clear()
        again = load_dataset(spec, "val")  # the shard is listed again, and the record with it
        assert again.offsets.tolist() == listed.offsets.tolist() and again.sizes.tolist() == listed.sizes.tolist(), why
        assert json.loads(record_path.read_text()) == record, why
    # A store that reports no version for a shard: its size alone would not tell an edit, so nothing is kept.
    shard = tmp_path / "wds" / "train-0000.tar"
    assert len(list_shard(str(shard), (shard.stat().st_size, "")).keys) == 18
    assert [p.name for p in (tmp_path / "checks" / "wds").iterdir()] == [record_path.name]
