"""Declared sizes trusted before checking (issue 29, class 3): every size read from a file is bounded by what
the manifest and the request imply before anything is allocated or decompressed. Each bomb is crafted with
digests recomputed and read under `prlimit --as` (forgery.memory_bounded): the outcome is one refusal line,
not a MemoryError or an OOM kill."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from forgery import manifest_of, memory_bounded, recompute_digests, replace_block, save_manifest

STREAM = ("from pipeline.train.loop import open_cache\nfrom pipeline.train.stream import CacheStream\n"
          "from pipeline.cache.targets import LOGITS\n"
          "stream = CacheStream(open_cache({root!r}), size=16, targets=frozenset({{LOGITS}}), seed=0)\n"
          "for _ in stream.loader(0, batch_size=32, workers={workers}):\n    pass\n")


def refusal(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-3000:]
    return lines[0]


def tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    return info.tobuf(format=tarfile.GNU_FORMAT)  # base-256 sizes: 10^12 does not fit ustar's octal


@pytest.mark.parametrize("workers", [0, 1])
def test_a_tar_member_declaring_a_terabyte(forged: Path, workers: int) -> None:
    shard = forged / "shards" / "train-000000.tar"
    with tarfile.open(shard) as tar:
        first = tar.getmembers()[0]
        data = tar.extractfile(first).read()
    shard.write_bytes(tar_header(first.name, 10 ** 12) + data[:1024] + b"\0" * 1024)
    recompute_digests(forged)
    line = refusal(memory_bounded(STREAM.format(root=str(forged), workers=workers)))
    assert "declares 1,000,000,000,000 bytes, more than the file holds" in line, line


def test_a_sparse_tar_member(forged: Path) -> None:
    """An old-GNU sparse member (type S) whose map expands 1 KB to 3 GiB: the writer never writes one."""
    header = bytearray(tar_header("sparse", 512))
    header[156:157] = b"S"
    header[386:386 + 24] = b"%011o\0%011o\0" % (3 << 30, 512)  # one block of data at offset 3 GiB
    header[483:495] = b"%011o\0" % ((3 << 30) + 512)  # the expanded size
    header[148:156] = b"%06o\0 " % (sum(header[:148]) + 8 * 32 + sum(header[156:]))
    shard = forged / "shards" / "train-000000.tar"
    shard.write_bytes(bytes(header) + b"x" * 512 + b"\0" * 1024)
    recompute_digests(forged)
    line = refusal(memory_bounded(STREAM.format(root=str(forged), workers=0)))
    assert "(sparse), more than the file holds" in line, line


def npy(shape: tuple[int, ...], payload: bytes) -> bytes:
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return f.getvalue() + payload


@pytest.mark.parametrize("workers", [0, 1])
def test_an_npy_header_declaring_ten_terabytes(forged: Path, workers: int) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("raw.npy", npy((10 ** 13,), b"\0" * 64))
        zf.writestr("raw_shape.npy", npy((1, 3), b"\0" * 3))
        zf.writestr("raw_offsets.npy", npy((2,), b"\0" * 2))
    replace_block(forged, 0, buf.getvalue())
    line = refusal(memory_bounded(STREAM.format(root=str(forged), workers=workers)))
    assert "declares (10000000000000,) uint8, not the 64 bytes it holds" in line, line


def test_a_zip_member_inflating_a_megabyte_to_a_gibibyte(forged: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("raw.npy", "w", force_zip64=True) as f:
            f.write(npy((1 << 30,), b""))
            zeros = b"\0" * (1 << 24)
            for _ in range(64):
                f.write(zeros)
    assert len(buf.getvalue()) < 2 << 20
    replace_block(forged, 0, buf.getvalue())
    line = refusal(memory_bounded(STREAM.format(root=str(forged), workers=0)))
    assert "member raw.npy is compressed or larger than its block" in line, line


@pytest.mark.parametrize("n, expected", [(10 ** 12, "dataset.num_samples must lie in [1, 2147483647]"),
                                         (10 ** 9, "at most storage.shard_size each")])
def test_a_trillion_samples_in_the_manifest_and_every_zarr_json(forged: Path, n: int, expected: str) -> None:
    def huge(m: dict) -> None:
        m["dataset"]["num_samples"] = n
        m["shards"][-1]["stop"] = n
        for meta in m["arrays"].values():
            meta["shape"][0] = n

    for meta_path in (forged / "arrays.zarr").rglob("zarr.json"):
        meta = json.loads(meta_path.read_text())
        if meta.get("node_type") == "array" and "stats" not in meta_path.parts:
            meta["shape"][0] = n
            meta_path.write_text(json.dumps(meta))
    manifest = manifest_of(forged)  # no digest recomputed: that would read a trillion rows
    huge(manifest)
    save_manifest(forged, manifest)
    line = refusal(memory_bounded(STREAM.format(root=str(forged), workers=0)))
    assert expected in line, line


def test_a_statistics_shape_of_a_million_squared(forged: Path) -> None:
    path = forged / "arrays.zarr" / "stats" / "pca" / "components" / "zarr.json"
    meta = json.loads(path.read_text())
    meta["shape"] = meta["chunk_grid"]["configuration"]["chunk_shape"] = [10 ** 6, 10 ** 6]
    path.write_text(json.dumps(meta))
    line = refusal(memory_bounded(f"from pipeline.cache.reader import TeacherCache\n"
                                  f"TeacherCache({str(forged)!r}).statistics()\n"))
    assert "declares shape [1000000, 1000000], more than the manifest implies" in line, line


def test_a_chunk_larger_than_its_array(forged: Path) -> None:
    path = forged / "arrays.zarr" / "samples" / "labels" / "zarr.json"
    meta = json.loads(path.read_text())
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [1 << 40]
    path.write_text(json.dumps(meta))
    line = refusal(memory_bounded(f"from pipeline.cache.reader import TeacherCache\nTeacherCache({str(forged)!r})\n"))
    assert "with chunks [1099511627776] is not an array this cache writes" in line, line


def test_a_faiss_index_declaring_two_to_the_forty_vectors(forged: Path) -> None:
    path = forged / "lsh.faiss"
    data = bytearray(path.read_bytes())
    data[12:20] = struct.pack("<q", 1 << 40)
    data[25:33] = struct.pack("<Q", (1 << 40) * 2)
    path.write_bytes(bytes(data))
    recompute_digests(forged)
    line = refusal(memory_bounded(f"from pipeline.cache.reader import TeacherCache\n"
                                  f"TeacherCache({str(forged)!r}).lsh_index()\n"))
    assert "is not a flat index of 120 codes of 16 bits" in line, line


def rle_frame(size: int, declared: bool) -> bytes:
    """A zstd frame of `size` zero bytes in 4-byte RLE blocks of 128 KiB each (RFC 8878, section 3.1.1.2):
    2 GiB in 64 KiB, declaring its size in the header or not."""
    block = 128 << 10
    count = -(-size // block)
    # Frame header: magic, descriptor (8-byte content size or none), window descriptor (2^17 bytes).
    header = b"\x28\xb5\x2f\xfd" + (bytes([0xC0, 0x38]) + size.to_bytes(8, "little") if declared else b"\x00\x38")
    return header + b"".join((min(block, size - i * block) << 3 | 1 << 1 | (i == count - 1)).to_bytes(3, "little")
                             + b"\0" for i in range(count))


@pytest.mark.parametrize("chunk, expected, workers", [  # the default --workers 1 for each, and 0 once
    (rle_frame(2 << 30, declared=True), "declares 2,147,483,648 bytes, not the 1,600 the chunk holds", 1),
    (rle_frame(2 << 30, declared=False), "declares no decompressed size, not the 1,600 the chunk holds", 1),
    (rle_frame(2 << 30, declared=False), "declares no decompressed size, not the 1,600 the chunk holds", 0),
    (rle_frame(1600, declared=True) + rle_frame(2 << 30, declared=False), "does not decompress to its 1,600 bytes",
     1),
], ids=["declared-1", "undeclared-1", "undeclared-0", "two-frames-1"])
def test_a_zstd_chunk_inflating_to_two_gibibytes(forged: Path, chunk: bytes, expected: str, workers: int) -> None:
    """A 64 KiB chunk of the teacher's logits that zstd inflates to 2 GiB: no digest is recomputed (the forger's
    own zarr would inflate it), as none is read before the chunk is decoded."""
    path = forged / "arrays.zarr" / "logits" / "dense" / "c" / "0" / "0" / "0"
    assert len(chunk) < 70_000 and path.is_file()
    path.write_bytes(chunk)
    line = refusal(memory_bounded(STREAM.format(root=str(forged), workers=workers)))
    assert "a zstd chunk of [40, 2, 10] float16 in arrays.zarr " + expected in line, line


@pytest.mark.parametrize("codec", [{"name": "gzip", "configuration": {"level": 1}},
                                   {"name": "blosc", "configuration": {"cname": "zstd", "clevel": 1}}])
def test_a_codec_the_cache_never_writes(forged: Path, codec: dict) -> None:
    """gzip and blosc inflate what their streams declare, unbounded: only bytes and zstd are opened."""
    path = forged / "arrays.zarr" / "logits" / "dense" / "zarr.json"
    meta = json.loads(path.read_text())
    meta["codecs"] = [meta["codecs"][0], codec]
    path.write_text(json.dumps(meta))
    line = refusal(memory_bounded(f"from pipeline.cache.reader import TeacherCache\nTeacherCache({str(forged)!r})\n"))
    assert f"codecs ['bytes', '{codec['name']}'] are not the ones this cache writes" in line, line


def forge_tail(root: Path, edit) -> None:
    """`teacher_tail.pt` with its spec changed by `edit`, its weights as stored, digests recomputed."""
    import torch

    path = root / "teacher_tail.pt"
    stored = torch.load(path, weights_only=True)
    edit(stored["spec"])
    torch.save(stored, path)
    recompute_digests(root)


@pytest.mark.parametrize("edit, expected", [
    (lambda spec: spec["modules"][0]["blocks"][0].update(planes=20_000),
     "gives [80000, 2, 2] maps, not the cached [192, 2, 2]"),
    (lambda spec: spec["modules"][0]["blocks"][0].update(base_width=20_000),  # 15,000-wide 3x3 convolution: 8 GB
     "implies other weights than the stored ones (11 differ, e.g. 0.0.bn1.bias: (15000,) built, (48,) stored)"),
    (lambda spec: spec.update(input_shape=[48, 100_000, 100_000]),
     "takes [48, 100000, 100000] maps through 1 modules, more than a 32-px teacher's stages give"),
    (lambda spec: spec["modules"][0]["blocks"][0].update(stride="2"), "does not build (TypeError"),
], ids=["planes", "base-width", "input-side", "stride-text"])
def test_a_teacher_tail_of_twenty_thousand_planes(forged: Path, edit, expected: str) -> None:
    """ScaleKD's stored teacher tail (docs/methods.md#scalekd) whose spec declares widths its stored weights do
    not have: refused from its shapes, as ScaleKD loads it, before a module is built."""
    forge_tail(forged, edit)
    line = refusal(memory_bounded(f"from pipeline.cache.reader import TeacherCache\n"
                                  f"from pipeline.nets.tail import build_teacher_tail\n"
                                  f"build_teacher_tail(*TeacherCache({str(forged)!r}).teacher_tail())\n"))
    assert f"{forged / 'teacher_tail.pt'}: the teacher tail's spec {expected}" in line, line
