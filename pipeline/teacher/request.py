"""What `distillery cache` asks for: the request of a teacher pass, its options declared with their ranges and
meaning (docs/guide.md#option-checks). Importing it imports no torch: the command line reads its defaults and
help to print `distillery cache --help`; `pipeline.teacher.plan` checks and plans it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import field_validator

from pipeline.cache.bounds import MAX_GRID, MAX_LSH_BITS, MAX_SHARD_SIZE, MAX_STAGES, MAX_VIEWS
from pipeline.cache.inputs import INPUTS_HELP, MAX_SHARD_BYTES, SHARD_BYTES
from pipeline.cache.targets import STORABLE
from pipeline.data.datasets import BAD_IMAGE_HELP, BAD_IMAGE_POLICIES
from pipeline.options import MAX_BATCH, MAX_INPUT_SIZE, MAX_SEED, Config, Help, Range


class CacheRequest(Config):
    """What `distillery cache` asks for (JSON-able: it is a Prefect flow parameter)."""

    dataset: str
    teacher: Annotated[str | None, Help("timm model name of the teacher (default: the architecture an hf-hub: "
                                        "--weights names)")]
    out: Annotated[str, Help("cache directory or fsspec URL (s3://bucket/prefix, needs the s3 extra)")]
    split: Annotated[str, Help("dataset split to cache")] = "train"
    subset: Annotated[int | None, Range(ge=1), Help("seeded, stratified subset")] = None
    subset_seed: Annotated[int, Range(ge=0, le=MAX_SEED), Help("seed of the subset")] = 0
    checkpoint: Annotated[str | None, Help("teacher checkpoint (distillery fit-teacher)")] = None
    weights: Annotated[str | None, Help("pretrained teacher weights: a .safetensors/.pth/.pt/.bin state dict (timm "
                                        "or torchvision keys) or hf-hub:ORG/NAME[@REVISION] from the local Hugging "
                                        "Face cache; renders follow their preprocessing")] = None
    class_map: Annotated[str | dict[str, Any] | None, Help(
        "JSON file mapping each dataset class to teacher class indices: logits are the mapped ones "
        "(docs/guide.md#your-own-teacher); a repair passes the manifest's copy")] = None
    teacher_head: Annotated[bool, Help("keep the teacher's classifier: logits too (false: features and statistics "
                                       "only)")] = True
    views: Annotated[int, Range(ge=0, le=MAX_VIEWS), Help("augmented views per sample, besides the clean view 0")] = 2
    view_seed: Annotated[int, Range(ge=0, le=MAX_SEED),
                         Help("seed of the views' augmentations (a view is replayed from seed, "
                              "sample id and view id)")] = 0
    logits: Annotated[str, Help("dense | topk:K (top K logits + the tail's log-sum-exp)")] = "dense"
    tap: Annotated[str, Help("stage for Gaussian stats and feature maps: auto (the deepest whose map fits the grid) "
                             "| none | stage name | index")] = "auto"
    grid: Annotated[int, Range(ge=1, le=MAX_GRID), Help("G x G grid of Gaussian cells")] = 1
    featmaps: Annotated[bool, Help("also store the tapped feature maps (large)")] = False
    teacher_tail: Annotated[int, Range(ge=0, le=MAX_STAGES),
                            Help("save the N teacher stages ending at the tap for ScaleKD's "
                                 "tpp=true (needs --featmaps)")] = 0
    store: Annotated[str | None, Help(f"per-sample targets kept, comma-separated from {','.join(STORABLE)} "
                                      f"(default: every one the other options produce); statistics need their "
                                      f"rows: no pooled, no PCA, class means or LSH")] = None
    lsh_bits: Annotated[int, Range(ge=0, le=MAX_LSH_BITS),
                        Help("LSH bits per sample (multiple of 8; 0: none) for eLSH and "
                             "`distillery neighbors`")] = 0
    input_size: Annotated[int | None, Range(ge=8, le=MAX_INPUT_SIZE),
                          Help("teacher render size (default: the checkpoint's, else 32 "
                               "for small images, 224 otherwise)")] = None
    shard_size: Annotated[int, Range(ge=1, le=MAX_SHARD_SIZE),
                          Help("samples per shard (the unit of work, resume and checksums)")] = 1024
    shard_bytes: Annotated[int, Range(ge=1, le=MAX_SHARD_BYTES),
                           Help("the most bytes of stored inputs a shard holds (held in memory until it is "
                                "written): fewer samples than --shard-size where images are large")] = SHARD_BYTES
    batch_size: Annotated[int, Range(ge=1, le=MAX_BATCH), Help("images per teacher forward")] = 256
    block_size: Annotated[int, Range(ge=1, le=MAX_SHARD_SIZE),
                          Help("samples per block of a shard (the unit of decoding)")] = 256
    cka_source: Annotated[str, Help("what the category interrelations (WKD-L's cost) are computed from; auto: "
                                    "logits if stored")] = "auto"
    device: Annotated[str, Help("auto | cpu | cuda | cuda:N")] = "auto"
    on_bad_image: Annotated[Literal[BAD_IMAGE_POLICIES], Help(BAD_IMAGE_HELP)] = "fail"
    inputs: Annotated[str, Help(INPUTS_HELP)] = "auto"
    max_side: Annotated[int | None, Range(ge=1), Help("shrink each image so its longer side is at most this many "
                                                      "pixels before storing it (decoded at a reduced JPEG scale "
                                                      "first); default: full size")] = None
    reduced_decode: Annotated[bool | None, Help("decode image files only as large as the smallest view crop needs "
                                                "at the input size (storage.decode_min_side); false: at full size, "
                                                "as caches made before it; none (auto): the cache already at "
                                                "--out's choice, else true")] = None
    resize: Annotated[Literal["auto", "float32", "uint8"],
                      Help("the arithmetic views are resized in (views.resize, docs/ARCHITECTURE.md#views): uint8, "
                           "the pixels resized then / 255 (a CPU renders ~1.5x faster); float32: as caches made "
                           "before it; auto: the cache already at --out's, else uint8 for image files and float32 "
                           "for in-memory datasets")] = "auto"

    @field_validator("store")
    @classmethod
    def _one_spelling(cls, store: str | None) -> str | None:
        if store is None:
            return None
        listed = store.split(",")
        unknown = [t for t in listed if t not in STORABLE]
        if unknown or not listed:
            from pipeline.teacher.model import TeacherError  # torch: imported only for the error

            raise TeacherError(f"--store {store!r}: {unknown} are not per-sample targets; list some of "
                               f"{','.join(STORABLE)}")
        return ",".join(t for t in STORABLE if t in listed)  # one spelling per choice: same identity
