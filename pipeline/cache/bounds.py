"""The bounds a cache is read within (docs/cache-format.md#security): every size, count and name a manifest
or an option may declare, checked before anything is allocated, passed on or deleted. A forger who
recomputes every digest still cannot make a reader allocate more than these imply.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import DistilleryError
from pipeline.object_store import ObjectPath
from pipeline.options import MAX_INPUT_SIZE

MAX_MANIFEST_BYTES = 64 << 20
"""The largest manifest read: ImageNet's (1.28M samples in 1,250 shards) is about 3 MiB."""
MODEL_KWARGS = {"img_size": (8, MAX_INPUT_SIZE), "patch_size": (1, MAX_INPUT_SIZE)}
"""The only `teacher.model_kwargs` a cache passes to `timm.create_model`, each an integer in its [low, high]:
the render size of a fixed-size ViT, and the patch size of one fitted with `fit-teacher --patch-size`."""
MAX_CLASSES = 100_000
MAX_STAGES = 64
MAX_SHARD_SIZE = 1 << 16
"""The most samples per shard (or block): the unit held in memory while a shard is written or read."""
MAX_LSH_BITS = 4096
MAX_VIEWS = 64
"""The most augmented views per sample: a shard's rows of every view are held in memory while it is written."""
MAX_GRID = 64
MAX_SAMPLES = (1 << 31) - 1
"""The most samples a cache holds: labels are stored as int32."""
STATISTICS_ARRAYS = frozenset({
    "stats/pca/mean", "stats/pca/components", "stats/pca/explained_variance", "stats/classes/mean",
    "stats/classes/count", "stats/cka/ir", "stats/gaussian/channel_mean", "stats/gaussian/channel_std",
    "stats/lsh/planes", "stats/lsh/thresholds", "lsh/codes"})
"""Every dataset-level array a cache has ever written (docs/cache-format.md#contract): the only names
`stats.arrays` and `digests` may list, so `distillery stats`, which deletes the arrays the old statistics
listed, can delete nothing else."""


def reachable_file(path: Path | ObjectPath, error: type[DistilleryError]) -> bool:
    """Whether `path` is a file; an object store that cannot be asked is one `error` saying so (fsspec's
    `isfile` would answer False, and the cache be called "not a teacher cache")."""
    if isinstance(path, Path):
        return path.exists()  # a FIFO or directory of that name is refused by the bounded read, in one line
    try:
        return path.fs.info(path.key)["type"] == "file"
    except FileNotFoundError:
        return False
    except Exception as e:  # botocore's connection and credential errors are not OSErrors
        reason = (str(e).splitlines() or [""])[0]
        raise error(f"cannot reach {path} ({type(e).__name__}: {reason}); check the URL, the endpoint "
                    f"(AWS_ENDPOINT_URL) and the credentials") from None
