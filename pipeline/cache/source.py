"""The dataset a cache was made from, loaded again from its manifest (for re-rendering cached views)."""

from __future__ import annotations

from pipeline.cache.manifest import CacheError
from pipeline.cache.reader import TeacherCache
from pipeline.data.datasets import ImageDataset, load_dataset


def source_dataset(cache: TeacherCache) -> ImageDataset:
    """The manifest's dataset (spec, split, subset), refused unless its fingerprint is the cache's; its
    images decoded as the cache's inputs are (`--max-side`, `decode_min_side`).

    Row i of the cache is position i of this dataset: the teacher pass writes samples in dataset order
    (docs/cache-format.md#contract `samples/ids` "stored order"), and an equal fingerprint means equal ids and labels.
    """
    d = cache.manifest.dataset
    dataset = load_dataset(d.name, split=d.split, subset=d.subset, seed=d.subset_seed,
                           on_bad_image=d.on_bad_image or "fail")
    if dataset.fingerprint() != d.fingerprint:
        raise CacheError(f"the dataset {d.name} ({d.split}) found here is not the one {cache.root} was made "
                         f"from (fingerprint {dataset.fingerprint()[:12]}, cache {d.fingerprint[:12]}); "
                         f"run where the original data is; if it is here, the cache's samples were altered: re-create "
                         f"it with `distillery cache`")
    return dataset.with_max_side(cache.manifest.storage.max_side, cache.manifest.storage.decode_min_side)
