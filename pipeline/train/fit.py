"""`distillery fit-teacher`: train a timm teacher locally, from random weights or fine-tuning pretrained ones.

Nothing is downloaded: ``--weights`` is a state dict file or a snapshot already in the local Hugging Face cache,
resolved as `distillery cache --weights` resolves it (`pipeline.teacher.weights`, docs/guide.md#your-own-teacher).
Fine-tuning normalises with the weights' mean and std and renders at their input size unless told
otherwise; the checkpoint records the starting weights' sha256.

Each epoch draws fresh random-resized-crop + flip views through the same `render_view` the cache uses.
The checkpoint (`pipeline.teacher.checkpoint.TeacherCheckpoint`) holds the state dict plus what a cache needs
to rebuild the teacher's inputs exactly (input size, normalisation), and loads with
`torch.load(weights_only=True)`.

Objectives: ``supervised`` (cross-entropy on the labels) or ``ssl``, a teacher that never sees a label:
SimCLR's two-view contrastive objective (Chen et al., "A Simple Framework for Contrastive Learning of
Visual Representations", ICML'20): views 1 and 2 of each sample under one `ViewPlan` per epoch,
brightness and contrast jitter on each (`photometric_jitter`, SimCLR's colour distortion for any channel
count), the pooled features through a 2-layer MLP projector, NT-Xent over the batch (`nt_xent`). The projector is
dropped and the classifier stays untrained: cache such a checkpoint with ``--teacher-head none`` (its
pooled features serve TCS and eLSH).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from pipeline.data.datasets import load_dataset
from pipeline.data.rendering import RenderedViews, default_input_size, worker_context
from pipeline.data.views import ViewPlan
from pipeline.nets.tapped import create_timm_model
from pipeline.options import OptionError, check_device, check_output_file, resolve_device
from pipeline.progress import progress_task
from pipeline.teacher.checkpoint import TeacherCheckpoint
from pipeline.teacher.weights import resolve_sized
from pipeline.train.evaluate import evaluate_accuracy
from pipeline.train.fit_config import FitConfig
from pipeline.train.optim import OptimConfig, build_optimizer, cosine_schedule

class FitResult(BaseModel):
    """What `fit_teacher` returns: the checkpoint written and how the fit went."""

    model_config = ConfigDict(frozen=True)

    model: str
    val_accuracy: float | None  # None for an ssl teacher: its classifier was never trained
    train_seconds: float
    out: str
    num_samples: int
    input_size: int
    skipped_images: list[str]  # undecodable images left out (--on-bad-image skip)


def check_fit(cfg: FitConfig) -> None:
    """Everything `fit_teacher` would refuse, found before any work: the device, where the checkpoint goes
    (not over an existing one unless `overwrite`), every split's images and the starting weights (one line
    each)."""
    check_device(cfg.device)
    check_output_file(cfg.out)
    if Path(cfg.out).expanduser().exists() and not cfg.overwrite:
        raise OptionError(f"--out {cfg.out} exists; pass --overwrite to replace it (the caches made from it "
                          f"would then fail verify)")
    if cfg.weights is not None and cfg.patch_size is not None:  # the weights fix the patch embedding's shape
        raise OptionError("--patch-size cannot change the architecture of --weights; leave it out to fine-tune "
                          "the weights as they are, or drop --weights to fit a new model")
    splits = [load_dataset(cfg.dataset, split, on_bad_image=cfg.on_bad_image) for split in ("train", "val")]
    if cfg.weights is not None:  # loaded here too: weights that do not fit are one line, not a failed flow run
        _pretrained_start(cfg, splits[0].num_classes, splits[0].channels)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al., ICML'20, eq. 1) of N pairs (a_i, b_i): the mean over all 2N anchors of
    ``-log(exp(s(i, p(i)) / tau) / sum_{k != i} exp(s(i, k) / tau))``, s the cosine similarity and p(i) the
    anchor's other view."""
    z = F.normalize(torch.cat([a, b]).float(), dim=1)
    n = len(a)
    logits = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, positives)


def photometric_jitter(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], strength: float,
                       generator: torch.Generator) -> torch.Tensor:
    """SimCLR's colour distortion (Chen et al., ICML'20, appendix A) reduced to what every channel count has:
    with probability 0.8 per view, brightness then contrast, each a factor drawn from
    ``U[1 - 0.8 s, 1 + 0.8 s]`` and applied as torchvision's ``adjust_brightness`` / ``adjust_contrast`` do, on
    pixels in [0, 1]. Without it two crops of one image share their intensity histogram, a cue that solves
    the contrastive task without learning shapes (the paper's §3 ablation: crops alone fall far behind).
    ``x`` holds normalised views (N, C, H, W); the result is normalised the same way."""
    if strength == 0:
        return x
    n, like = len(x), dict(dtype=x.dtype, device=x.device)
    mean_t, std_t = (torch.tensor(v, **like).view(1, -1, 1, 1) for v in (mean, std))
    pixels = x * std_t + mean_t
    low, high = 1 - 0.8 * strength, 1 + 0.8 * strength
    # Drawn from the (CPU) generator, so a fit is the same on every device.
    brightness, contrast = (low + (high - low) * torch.rand(2, n, 1, 1, 1, generator=generator)).to(**like)
    apply = (torch.rand(n, 1, 1, 1, generator=generator) < 0.8).to(**like)
    jittered = (pixels * brightness).clamp(0, 1)
    # adjust_contrast blends toward the mean of the image's greyscale (ITU-R 601-2 luma for RGB).
    luma = jittered
    if x.shape[1] == 3:
        luma = (jittered * torch.tensor([0.2989, 0.587, 0.114], **like).view(1, 3, 1, 1)).sum(1, keepdim=True)
    grey = luma.mean(dim=(1, 2, 3), keepdim=True)
    jittered = ((jittered - grey) * contrast + grey).clamp(0, 1)
    return (apply * jittered + (1 - apply) * pixels - mean_t) / std_t


def pair_batches(n: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffled batches of indices into `n` first views followed by `n` second views: batch = I + (I + n)."""
    order = torch.randperm(n, generator=generator).tolist()
    return [chunk + [i + n for i in chunk] for chunk in (order[s:s + batch_size] for s in range(0, n, batch_size))]


def projector(width: int, out: int = 128) -> torch.nn.Module:
    """SimCLR's projection head g: Linear-ReLU-Linear on the pooled feature (trained, then dropped)."""
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, out))


def _pretrained_start(cfg: FitConfig, num_classes: int, in_chans: int) -> tuple[
        torch.nn.Module, tuple[float, ...], tuple[float, ...], int, dict[str, str]]:
    """The model to fine-tune from ``cfg.weights``: the weights' head where it has ``num_classes``, else a new
    one (timm's initialisation, seeded); their mean and std; the input size (``cfg.input_size``, else theirs);
    the checkpoint's record of where it started."""
    got = resolve_sized(cfg.weights, cfg.model, num_classes=num_classes, fallback_classes=0, in_chans=in_chans,
                        input_size=cfg.input_size)
    if got.num_classes != num_classes:
        got.model.reset_classifier(num_classes)
    size = cfg.input_size or got.preprocessing.input_size[-1]
    return (got.model, got.preprocessing.mean, got.preprocessing.std, size,
            {"start_weights": cfg.weights, "start_weights_sha256": got.sha256})


def fit_teacher(cfg: FitConfig) -> FitResult:
    """Train `cfg.model` on the dataset's train split, evaluate on val, save the checkpoint atomically.

    Everything that can refuse the job (device, where the checkpoint goes, every split's images) is checked
    before the first step, so nothing is trained for a checkpoint that cannot be written.
    """
    check_fit(cfg)
    ssl = cfg.objective == "ssl"
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    train = load_dataset(cfg.dataset, "train", subset=cfg.subset, seed=cfg.seed, on_bad_image=cfg.on_bad_image)
    val = load_dataset(cfg.dataset, "val", on_bad_image=cfg.on_bad_image)
    full_train = load_dataset(cfg.dataset, "train", on_bad_image=cfg.on_bad_image)
    if cfg.weights is None:
        mean, std = full_train.pixel_stats()
        size = cfg.input_size or default_input_size(train)
        model_kwargs = {"patch_size": cfg.patch_size} if cfg.patch_size else {}
        model = create_timm_model(cfg.model, train.num_classes, train.channels, size, **model_kwargs)
        started: dict[str, str] = {}
    else:
        model, mean, std, size, started = _pretrained_start(cfg, train.num_classes, train.channels)
    # Decoded only as large as the views need at `size` (docs/cache-format.md#inputs): a camera's resolution
    # costs the fit no memory.
    train = train.with_max_side(None, ViewPlan(num_augmented=2 if ssl else 1).source_side(size))
    val = val.with_max_side(None, ViewPlan(num_augmented=0).source_side(size))
    model = model.to(device)
    head = projector(model.num_features).to(device) if ssl else torch.nn.Identity()
    optim_cfg = OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay)
    optimizer = build_optimizer([*model.parameters(), *head.parameters()], optim_cfg)
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    schedule = cosine_schedule(optimizer, cfg.epochs * steps_per_epoch, steps_per_epoch)
    positions = np.arange(len(train))
    start = time.perf_counter()
    model.train()
    with progress_task(f"fit {cfg.model}", cfg.epochs * len(train)) as bar:
        for epoch in range(cfg.epochs):
            # A new plan seed per epoch gives every sample a fresh augmentation (view 1 of that plan; views 1
            # and 2, the contrastive pair, for ssl).
            plan = ViewPlan(num_augmented=2 if ssl else 1, seed=cfg.seed * 1_000_003 + epoch)
            generator = torch.Generator().manual_seed(cfg.seed + epoch)
            if ssl:
                views = RenderedViews(train, plan, np.tile(positions, 2), np.repeat([1, 2], len(train)), size, mean,
                                      std)
                batching = dict(batch_sampler=pair_batches(len(train), cfg.batch_size, generator))
            else:
                views = RenderedViews(train, plan, positions, np.ones(len(train), dtype=np.int64), size, mean, std)
                batching = dict(batch_size=cfg.batch_size, shuffle=True, drop_last=False, generator=generator)
            loader = torch.utils.data.DataLoader(views, num_workers=cfg.workers,
                                                 multiprocessing_context=worker_context(cfg.workers), **batching)
            for x, y in loader:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    if ssl:
                        x = photometric_jitter(x.to(device), mean, std, cfg.jitter, generator)
                        embedded = head(model.forward_head(model.forward_features(x), pre_logits=True))
                        loss = nt_xent(*embedded.chunk(2), cfg.temperature)
                    else:
                        loss = F.cross_entropy(model(x.to(device)), y.to(device),
                                               label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.advance(len(y) // 2 if ssl else len(y))
    seconds = time.perf_counter() - start
    # The ssl teacher's classifier was never trained: it has no accuracy to report.
    accuracy = None if ssl else evaluate_accuracy(model, val, size, mean, std, device=device)
    out = Path(cfg.out)
    TeacherCheckpoint(model=cfg.model, state_dict=model.cpu().state_dict(), num_classes=train.num_classes,
                      in_chans=train.channels, input_size=size, mean=mean, std=std, dataset=train.name,
                      val_accuracy=accuracy, config=cfg.model_dump(),
                      train_fingerprint=full_train.fingerprint(), **started).save(out)
    return FitResult(model=cfg.model, val_accuracy=accuracy, train_seconds=seconds, out=str(out),
                     num_samples=len(train), input_size=size, skipped_images=sorted({*train.skipped, *val.skipped}))
