import numpy as np
import pytest
import torch

from pipeline.cache.codecs import topk_decode, topk_encode
from pipeline.cache.targets import class_index_dtype


def _logits(shape=(4, 3, 50), dtype=torch.float32):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)


def test_encode_keeps_the_k_largest_and_the_tail_logsumexp():
    logits = _logits((6, 20))
    values, indices, tail = topk_encode(logits, 4)

    raw = logits.double().numpy()
    order = np.argsort(-raw, axis=-1)
    np.testing.assert_array_equal(indices.numpy(), order[:, :4])
    np.testing.assert_array_equal(values.numpy(), np.take_along_axis(raw, order[:, :4], -1).astype(np.float32))
    rest = np.take_along_axis(raw, order[:, 4:], -1)
    expected_tail = np.log(np.exp(rest).sum(axis=-1))
    np.testing.assert_allclose(tail.numpy(), expected_tail, rtol=1e-6)
    assert indices.dtype == torch.int64 and tail.dtype == torch.float32


def test_encode_keeps_input_dtype_and_computes_tail_in_float32():
    logits = _logits(dtype=torch.float16)
    values, _, tail = topk_encode(logits, 5)
    assert values.dtype == torch.float16 and tail.dtype == torch.float32
    _, _, tail_from_float32 = topk_encode(logits.float(), 5)
    torch.testing.assert_close(tail, tail_from_float32, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_temperature_one_is_exact_for_kept_classes_and_tail_mass(dtype):
    logits = _logits(dtype=dtype)
    k, num_classes = 7, logits.shape[-1]
    values, indices, tail = topk_encode(logits, k)
    decoded = topk_decode(values, indices.int(), tail, num_classes)  # int32 as stored in zarr

    original = torch.softmax(logits.double(), dim=-1)
    recovered = torch.softmax(decoded.double(), dim=-1)
    kept = torch.zeros_like(original, dtype=torch.bool).scatter(-1, indices, True)
    assert decoded.dtype == torch.float32
    torch.testing.assert_close(recovered[kept], original[kept], atol=1e-6, rtol=0)
    torch.testing.assert_close(
        recovered.masked_fill(kept, 0).sum(-1), original.masked_fill(kept, 0).sum(-1), atol=1e-6, rtol=0
    )
    # The tail mass is spread uniformly over the missing classes.
    missing = recovered[~kept].view(*logits.shape[:-1], num_classes - k)
    torch.testing.assert_close(missing, missing[..., :1].expand_as(missing), atol=1e-12, rtol=1e-9)


def test_k_equal_to_num_classes_roundtrips_exactly():
    logits = _logits()
    values, indices, tail = topk_encode(logits, logits.shape[-1])
    assert torch.isneginf(tail).all()
    decoded = topk_decode(values, indices, tail, logits.shape[-1])
    assert torch.equal(decoded, logits)


def test_other_temperatures_are_only_approximate():
    logits = _logits()
    values, indices, tail = topk_encode(logits, 7)
    decoded = topk_decode(values, indices, tail, logits.shape[-1])
    temperature = 4.0
    original = torch.softmax(logits / temperature, dim=-1).gather(-1, indices)
    recovered = torch.softmax(decoded / temperature, dim=-1).gather(-1, indices)
    assert (recovered - original).abs().max() > 1e-3


@pytest.mark.parametrize("k", [0, 51])
def test_invalid_k(k):
    with pytest.raises(ValueError, match="1 <= k <= number of classes"):
        topk_encode(_logits(), k)


def test_decode_rejects_code_wider_than_classes():
    values, indices, tail = topk_encode(_logits(), 10)
    with pytest.raises(ValueError, match="does not fit"):
        topk_decode(values, indices, tail, 8)


@pytest.mark.parametrize("num_classes, dtype", [(2, "uint8"), (256, "uint8"), (257, "uint16"), (65_536, "uint16"),
                                                (65_537, "int32")])
def test_topk_indices_take_the_smallest_type_holding_every_class(num_classes: int, dtype: str) -> None:
    assert class_index_dtype(num_classes) == dtype
    top = np.array(num_classes - 1)
    assert top.astype(dtype) == top  # the largest index survives the round trip
    smaller = {"uint16": "uint8", "int32": "uint16"}.get(dtype)
    assert smaller is None or top.astype(smaller) != top  # and no smaller type would hold it


@pytest.mark.parametrize("size", [0, 100, 1600, 70_000, 1 << 20])  # content-size fields of 1, 2 and 4 bytes
def test_zstd_content_size_reads_what_zstd_writes(size: int) -> None:
    from numcodecs.zstd import compress

    from pipeline.cache.codecs import zstd_content_size

    frame = compress(np.arange(size, dtype=np.uint8).tobytes(), 1)
    assert zstd_content_size(frame) == size
    assert zstd_content_size(b"\x00" + frame[1:]) is None  # not a zstd frame


def test_zarr_reads_a_zstd_chunk_up_to_its_size(tmp_path) -> None:
    import zarr
    from numcodecs.zstd import compress

    from pipeline.cache.layout import open_arrays
    from pipeline.cache.manifest import CacheError
    from pipeline.cache.writer import ROW_COMPRESSOR

    group = zarr.open_group(str(tmp_path / "arrays.zarr"), mode="w")
    group.create_array("rows", shape=(8, 100), chunks=(4, 100), dtype="float32", compressors=ROW_COMPRESSOR)
    group["rows"][...] = np.arange(800, dtype=np.float32).reshape(8, 100)
    rows = open_arrays(tmp_path / "arrays.zarr", mode="r")["rows"]
    np.testing.assert_array_equal(rows[...], np.arange(800, dtype=np.float32).reshape(8, 100))
    (tmp_path / "arrays.zarr" / "rows" / "c" / "1" / "0").write_bytes(compress(bytes(3200), 1))  # twice its size
    with pytest.raises(CacheError, match=r"^a zstd chunk of \[4, 100\] float32 in arrays.zarr declares 3,200 "
                                         r"bytes, not the 1,600 the chunk holds;"):
        rows[4:]
    np.testing.assert_array_equal(rows[:4], np.arange(400, dtype=np.float32).reshape(4, 100))
