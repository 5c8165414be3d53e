"""What `distillery fit-teacher` fits: the teacher's training options, declared with their ranges and meaning
(docs/guide.md#option-checks). Importing it imports no torch: the command line reads its defaults and help to
print `distillery fit-teacher --help`; `pipeline.train.fit` fits it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pipeline.data.datasets import BAD_IMAGE_HELP, BAD_IMAGE_POLICIES
from pipeline.options import (MAX_BATCH, MAX_EPOCHS, MAX_INPUT_SIZE, MAX_LR, MAX_SEED, MAX_WEIGHT_DECAY, MAX_WORKERS,
                              Config, Help, Range)

OBJECTIVES = ("supervised", "ssl")


class FitConfig(Config):
    """What `distillery fit-teacher` fits; stored in the checkpoint (`config`)."""

    dataset: str
    model: Annotated[str, Help("timm model name")]
    out: Annotated[str, Help("checkpoint path to write")]
    overwrite: Annotated[bool, Help("replace a checkpoint already at --out (refused otherwise: the caches made "
                                    "from it would no longer verify)")] = False
    epochs: Annotated[int, Range(ge=1, le=MAX_EPOCHS), Help("training epochs")] = 10
    subset: Annotated[int | None, Range(ge=1), Help("seeded, stratified subset of the train split")] = None
    seed: Annotated[int, Range(ge=0, le=MAX_SEED),
                    Help("seed of the initialisation, the subset and the augmentations")] = 0
    input_size: Annotated[int | None, Range(ge=8, le=MAX_INPUT_SIZE),
                          Help("render size (default 32 for small images, 224 "
                               "otherwise)")] = None
    patch_size: Annotated[int | None, Range(ge=1, le=64), Help(
        "patch size of a ViT-style model (timm's patch_size; default: the model's own, e.g. 16, which leaves a "
        "32-px image 2x2 tokens; 4 gives 8x8)")] = None
    batch_size: Annotated[int, Range(ge=1, le=MAX_BATCH), Help("images per optimiser step")] = 128
    lr: Annotated[float, Range(gt=0, le=MAX_LR), Help("peak learning rate (AdamW, cosine schedule after one "
                                                       "warm-up epoch)")] = 2e-3
    weight_decay: Annotated[float, Range(ge=0, le=MAX_WEIGHT_DECAY), Help("AdamW weight decay (not on norms and biases)")] = 0.05
    label_smoothing: Annotated[float, Range(ge=0, le=1), Help("label smoothing of the cross-entropy "
                                                              "(supervised)")] = 0.1
    workers: Annotated[int, Range(ge=0, le=MAX_WORKERS),
                       Help("DataLoader worker processes rendering the views (0: none)")] = 1
    device: Annotated[str, Help("auto | cpu | cuda | cuda:N")] = "auto"
    on_bad_image: Annotated[Literal[BAD_IMAGE_POLICIES], Help(BAD_IMAGE_HELP)] = "fail"
    objective: Annotated[Literal[OBJECTIVES], Help("supervised (labels) | ssl (SimCLR two-view NT-Xent, no labels; "
                                                   "cache it with --teacher-head none)")] = "supervised"
    temperature: Annotated[float, Range(ge=0.01, le=100), Help("NT-Xent temperature (ssl)")] = 0.2
    jitter: Annotated[float, Range(ge=0, lt=1.25), Help("SimCLR colour-distortion strength, brightness and contrast "
                                                        "(ssl; 0: crops and flips only)")] = 0.5
    weights: Annotated[str | None, Help("pretrained weights to fine-tune from: a .safetensors/.pth/.pt/.bin state "
                                        "dict of --model or hf-hub:ORG/NAME from the local Hugging Face cache; "
                                        "their mean, std and input size are used, a head of another size is "
                                        "replaced")] = None
