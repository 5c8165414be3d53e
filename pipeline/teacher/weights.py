"""Pretrained weights a user brings for a teacher, resolved offline by timm's own loaders.

A source is a local state dict (`.safetensors`, or a `.pth`/`.pt`/`.bin` pickle) for a named timm model, or
`hf-hub:ORG/NAME[@REVISION]` looked up only in the Hugging Face cache already on disk (nothing is downloaded:
this machine kind has no network, and a cache must not depend on one). The tensors reach the model through
`timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))`, so each architecture's own
`checkpoint_filter_fn` maps torchvision or original keys, resamples position embeddings and adapts the stem
to other input channels exactly as timm does; no key mapping is written here. Pickles are loaded with
`weights_only=True` (timm's loader), so a file that needs any code to unpickle is refused.

What comes back (`ResolvedWeights`) is the model, the sha256 of the file its tensors came from (part of a
cache's identity) and the `Preprocessing` the weights were trained with (from the model's pretrained config,
`timm.data.resolve_input_data_config`), which the renders for the teacher must follow.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.bounded import MIB, read_json
from pipeline.checksums import sha256_file
from pipeline.errors import DistilleryError

HF_PREFIX = "hf-hub:"
STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""The weight files of a Hub snapshot, in the order timm's Hub loader prefers them (safetensors first)."""

HF_CONFIG_LIMIT = MIB  # timm's config.json files are a few KiB
FIT_HINT = "check the model name, its options and the head size"
SOURCE_HINT = "give --weights a .safetensors/.pth/.pt/.bin state dict or hf-hub:ORG/NAME"
_TIMM_BUILDER_LOG = "timm.models._builder"
_LOAD_PROBLEMS = ("Missing keys", "Unexpected keys", "Unable to convert")
"""How timm's `load_pretrained` reports (only in its log) weights it did not load strictly."""


_TIMM_DATA_CONFIG_LOG = "timm.data.model_config"


def _averaged_statistics(record: logging.LogRecord) -> bool:
    """False for timm's "Pretrained mean does not match 1 channels; using its mean value." (and std): for a
    grey dataset this project averages the RGB statistics on purpose, as timm adapts the stem (recorded in the
    manifest, docs/guide.md#your-own-teacher), so the warning would only repeat, per build, what was asked."""
    return not (record.getMessage().startswith("Pretrained ") and "does not match" in record.getMessage())


class WeightsError(DistilleryError):
    """Weights that cannot be found, read or loaded into the teacher as asked; the message says what to do."""


@dataclass(frozen=True)
class Preprocessing:
    """How inputs must be prepared for the weights: what `timm.data.resolve_input_data_config` says for the
    model as built (its pretrained config, with the model's own size and channels where they differ)."""

    input_size: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]  # one per channel
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    crop_mode: str
    fixed_input_size: bool  # the model takes only `input_size` (a ViT without dynamic_img_size)

    @classmethod
    def of_model(cls, model: nn.Module, model_kwargs: dict[str, Any]) -> Preprocessing:
        """The preprocessing of ``model`` built with ``model_kwargs`` (an explicit ``img_size`` there is the
        size asked for, also for a model that accepts any size)."""
        from timm.data import resolve_input_data_config
        from timm.models import get_model_input_config

        timm_config = logging.getLogger(_TIMM_DATA_CONFIG_LOG)
        timm_config.addFilter(_averaged_statistics)
        try:
            config = resolve_input_data_config(model, args={"model_kwargs": model_kwargs})
        finally:
            timm_config.removeFilter(_averaged_statistics)
        channels = config["input_size"][0]

        def per_channel(values: tuple[float, ...]) -> tuple[float, ...]:
            # timm gives one value when it averaged RGB statistics for a one-channel model.
            return tuple(float(v) for v in (values * channels if len(values) == 1 else values))

        return cls(input_size=tuple(int(v) for v in config["input_size"]), mean=per_channel(config["mean"]),
                   std=per_channel(config["std"]), interpolation=str(config["interpolation"]),
                   crop_pct=float(config["crop_pct"]), crop_mode=str(config["crop_mode"]),
                   fixed_input_size=bool(get_model_input_config(model)["fixed_input_size"]))

    def to_dict(self) -> dict[str, Any]:
        """JSON types (lists for the tuples), for a manifest."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class ResolvedWeights:
    """A timm model holding the weights of ``source``, in eval mode (a fine-tuning caller sets train mode)."""

    model: nn.Module
    architecture: str  # the timm name it was built as (a pretrained tag, e.g. `resnet18.tv_in1k`, kept)
    source: str  # as given
    path: Path  # the file whose tensors were loaded
    sha256: str  # of that file
    revision: str | None  # the Hub snapshot's commit for an hf-hub source
    preprocessing: Preprocessing
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # given to `timm.create_model` (e.g. img_size)

    @property
    def num_classes(self) -> int:
        """Classes of the model's head; 0 for a head-less model."""
        return int(self.model.num_classes)


def hf_hub_cache() -> Path:
    """The Hugging Face cache folder, read from the environment now: huggingface_hub reads it once, when it is
    imported (timm imports it early), so a process that sets HF_HUB_CACHE or HF_HOME later would be ignored."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def resolve_weights(source: str, model: str | None = None, *, num_classes: int | None = None,
                    in_chans: int | None = None, **model_kwargs: Any) -> ResolvedWeights:
    """The timm model ``model`` holding the weights of ``source``, built offline.

    ``num_classes``: None keeps the weights' own head (its size from the pretrained config: 1000 for timm's
    ImageNet models, the config.json of a Hub snapshot); N says the weights' head has N classes (a model
    fine-tuned here), loaded strictly; 0 drops the head (a head-less teacher). ``in_chans`` other than the
    weights' adapts the stem the way timm does. ``model_kwargs`` go to `timm.create_model` (e.g. ``img_size``).
    Every problem is one :class:`WeightsError` line.
    """
    if source.startswith(HF_PREFIX):
        architecture, path, revision = _hf_snapshot_weights(source, model)
        name = f"local-dir:{path.parent}"  # timm reads the snapshot's config.json: model args, pretrained config
    else:
        architecture, path, revision = str(model), weights_file(source, model), None
        name = architecture
    digest = sha256_file(path)
    # timm's loader reads the very file hashed here (for a Hub snapshot: instead of choosing one itself).
    overlay: dict[str, Any] = {"source": None, "file": str(path)}
    if num_classes:
        overlay["num_classes"] = num_classes  # the weights' head has this size: load it strictly
    kwargs = {k: v for k, v in dict(model_kwargs, num_classes=num_classes, in_chans=in_chans).items()
              if v is not None}
    built = _create(name, architecture, path, overlay, kwargs)
    return ResolvedWeights(model=built.eval(), architecture=architecture, source=source, path=path,
                           sha256=digest, revision=revision, preprocessing=Preprocessing.of_model(built, kwargs),
                           model_kwargs=dict(model_kwargs))


def resolve_sized(source: str, model: str | None, *, num_classes: int | None, fallback_classes: int | None,
                  in_chans: int, input_size: int | None) -> ResolvedWeights:
    """`resolve_weights` with the head at ``num_classes`` when the weights have a head of that size, else at
    ``fallback_classes`` (None: the weights' own head; 0: none), at ``input_size`` (None: the weights'): a
    fixed-size model is rebuilt with that ``img_size``, timm resampling its position embeddings as it loads.
    A file that fits neither head raises the error of the first."""
    try:
        got = resolve_weights(source, model, num_classes=num_classes, in_chans=in_chans)
    except WeightsError as e:
        try:
            got = resolve_weights(source, model, num_classes=fallback_classes, in_chans=in_chans)
        except WeightsError:
            raise e from None
    if input_size and got.preprocessing.fixed_input_size and input_size != got.preprocessing.input_size[-1]:
        got = resolve_weights(source, model, num_classes=got.num_classes, in_chans=in_chans, img_size=input_size)
    return got


def weights_file(source: str, model: str | None = None) -> Path:
    """The file whose tensors ``source`` gives (checked as `resolve_weights` checks it), without loading it:
    what a cache's recorded sha256 is compared with."""
    if source.startswith(HF_PREFIX):
        return _hf_snapshot_weights(source, model)[1]
    if model is None:
        raise WeightsError(f"{source} is a state dict, which does not say which architecture it holds; "
                           f"name it with --teacher (a timm model, e.g. resnet18.tv_in1k)")
    return _local_state_dict(source, model)


def _local_state_dict(source: str, model: str) -> Path:
    """The state-dict file ``source`` for timm model ``model`` (tag included), both checked before loading."""
    import timm
    from timm.models import get_pretrained_cfg

    path = Path(source)
    if path.suffix.lower() not in STATE_DICT_SUFFIXES:
        raise WeightsError(f"{source} is neither a state dict file nor an hf-hub: source; {SOURCE_HINT}")
    if not path.is_file():
        raise WeightsError(f"weights file {source} does not exist (or is not a regular file); {SOURCE_HINT}")
    if not timm.is_model(model):
        raise WeightsError(f"unknown timm model '{model}'; see timm.list_models()")
    try:
        get_pretrained_cfg(model)
    except RuntimeError as e:  # timm: "Invalid pretrained tag (x) for resnet18."
        arch = model.split(".")[0]
        raise WeightsError(f"{e} Tags with a preprocessing config: timm.list_pretrained('{arch}.*')") from None
    return path


def _hf_snapshot_weights(source: str, model: str | None) -> tuple[str, Path, str]:
    """For ``hf-hub:ORG/NAME[@REVISION]``: the architecture its config.json names, the weight file of the
    cached snapshot and the snapshot's commit. Only the local cache is read."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    repo_id, _, revision = source[len(HF_PREFIX):].partition("@")
    revision = revision or "main"
    cache = hf_hub_cache()
    where = cache / f"models--{repo_id.replace('/', '--')}"
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except HFValidationError:
        raise WeightsError(f"{source}: '{repo_id}' is not a Hub repo id (ORG/NAME); {SOURCE_HINT}") from None
    except (LocalEntryNotFoundError, OSError):  # missing, or an incomplete snapshot (IncompleteSnapshotError)
        raise WeightsError(f"{source} is not in the local Hugging Face cache: looked for {where}/refs/{revision} "
                           f"and its snapshot (set HF_HUB_CACHE or HF_HOME to the cache that holds it; nothing "
                           f"is downloaded)") from None
    hint = f"a timm Hub snapshot holds config.json and one of {', '.join(HF_WEIGHT_FILES)}"
    config = read_json(snapshot / "config.json", HF_CONFIG_LIMIT, WeightsError, hint)
    architecture = config.get("architecture") if isinstance(config, dict) else None
    if not isinstance(architecture, str):
        raise WeightsError(f"{snapshot / 'config.json'} names no timm 'architecture'; {hint}")
    if model is not None and model.split(".")[0] != architecture:
        raise WeightsError(f"{source} holds a '{architecture}', not a '{model}'; pass --teacher {architecture} "
                           f"or leave --teacher out")
    path = next((snapshot / f for f in HF_WEIGHT_FILES if (snapshot / f).is_file()), None)
    if path is None:
        raise WeightsError(f"snapshot {snapshot} of {source} holds no weights; {hint}")
    return architecture, path, snapshot.name


def _create(name: str, architecture: str, path: Path, overlay: dict[str, Any], kwargs: dict[str, Any]) -> nn.Module:
    """`timm.create_model(name, pretrained=True, ...)` with every failure one line; weights timm loaded only
    partly (reported by timm in its log alone) are refused."""
    import timm

    try:
        with _timm_load_problems() as problems:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as e:  # noqa: BLE001 - a bad file fails in many ways (pickle, zip, safetensors, shapes)
        code = _pickled_code(path) if isinstance(e.__cause__, pickle.UnpicklingError) else []
        if code:
            raise WeightsError(f"{path} is a pickle that runs code when loaded ({', '.join(code)}), which "
                               f"weights_only=True refuses; save the model's state_dict() (torch.save, or "
                               f"safetensors) and give that file") from e
        raise WeightsError(f"{path} cannot be loaded into {architecture} ({FIT_HINT}): {_one_line(e)}") from e
    if problems:
        raise WeightsError(f"{path} does not fit {architecture} ({FIT_HINT}): {_one_line(problems[0])}")
    return model


def _pickled_code(path: Path) -> list[str]:
    """The callables a pickle names beyond tensors and plain values (read, never run); [] when it cannot tell."""
    import torch

    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - not a zip checkpoint at all: the loader's own message says so
        return []


@contextmanager
def _timm_load_problems() -> Iterator[list[str]]:
    """The messages in which timm's `load_pretrained` says it loaded weights non-strictly (keys missing or
    unexpected after dropping a head, a stem it could not adapt), filled when the block ends; it raises for
    none of them, and says "Missing keys" at INFO. timm's records are held meanwhile: those the process would
    have shown anyway are passed on afterwards, the INFO ones it would not have shown are dropped."""
    logger = logging.getLogger(_TIMM_BUILDER_LOG)
    shown, level, propagate = logger.getEffectiveLevel(), logger.level, logger.propagate
    records: list[logging.LogRecord] = []
    found: list[str] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Hold()
    logger.addHandler(handler)
    logger.setLevel(min(shown, logging.INFO))
    logger.propagate = False
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        for record in records:
            if record.getMessage().startswith(_LOAD_PROBLEMS):
                found.append(record.getMessage())
            elif record.levelno >= shown:
                logger.handle(record)


def _one_line(error: BaseException | str, limit: int = 400) -> str:
    """An exception's message on one line (torch lists state-dict mismatches one per line), shortened."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    text = text if isinstance(error, str) else f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."
