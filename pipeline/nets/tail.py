"""ScaleKD's teacher tail: a teacher's last stage(s), frozen, rebuilt without the teacher (docs/methods.md#scalekd).

Here, below both `teacher/` (which extracts it in the pass) and `methods/` (ScaleKD rebuilds it), since it
is plain timm module surgery.

TPP (teacher parameter perception) runs projected student features through the teacher's last stage(s)
and mimics the cached final features with the result. Training never constructs the teacher (docs/ARCHITECTURE.md#layers, docs/ARCHITECTURE.md#data-flow),
so the teacher pass saves just those stages: :func:`extract_teacher_tail` reads a spec (a plain dict of
JSON-able values: the stages' constructor arguments) and their state dict off a built teacher, and
:func:`build_teacher_tail` makes the same modules again from timm's block classes alone.

Families: timm ResNets (``layerK`` stages of ``BasicBlock``/``Bottleneck``), Swin (``layers.K`` stages),
ConvNeXt (``stages.K``) and ViTs (``blocks.K``; "a stage" is one block; DeiT and register-token ViTs are
timm ViTs too). The tail is the ``stages`` consecutive stages ending at
the tapped one, whose map the cache stores as ``featmaps/<tap>``; its input is the map that enters its
first stage (the teacher's previous-stage token layout). As the cache stores the stage outputs the way
``forward_intermediates`` returns them, without the final norm, the tail has no final norm either: its
output lives in the space of the cached maps. A ViT's blocks also attend to its prefix tokens (class,
distillation and register tokens), which the tail never sees: TPP feeds the student's projected map, which
has spatial tokens only, so the rebuilt blocks attend among the patch tokens (the teacher's own blocks on
the same tokens with the prefix removed; docs/guide.md#your-own-teacher).

Extraction rebuilds the tail and checks it on a probe image against the teacher's own modules, so a
variant these builders do not reproduce (other norms, activations, attention layers) is refused with a
:class:`ModelError` at caching time rather than trained on.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.nets.tapped import ModelError, stage_names

TAIL_FORMAT = "distillery-teacher-tail/1"


def _timm(family: str) -> ModuleType:
    """`timm.models.<family>`, imported on first use: importing timm costs seconds (torchvision, torch._dynamo),
    and a process that imports this module (the CLI, a student run without TPP) may never build a tail."""
    return importlib.import_module(f"timm.models.{family}")


def _resnet_blocks() -> dict[str, type[nn.Module]]:
    resnet = _timm("resnet")
    return {"BasicBlock": resnet.BasicBlock, "Bottleneck": resnet.Bottleneck}


def _resnet_block_spec(block: nn.Module) -> dict[str, Any]:
    """Constructor arguments of a timm ResNet block, read back from its layers."""
    blocks = _resnet_blocks()
    if type(block) not in blocks.values():
        raise ModelError(f"ResNet block {type(block).__name__} is not a timm BasicBlock or Bottleneck")
    if type(block) is blocks["BasicBlock"]:
        planes = block.conv2.out_channels
        cardinality, base_width = 1, 64
        reduce_first, first_dilation = planes // block.conv1.out_channels, block.conv1.dilation[0]
    else:
        planes = block.conv3.out_channels // blocks["Bottleneck"].expansion
        width, cardinality = block.conv2.out_channels, block.conv2.groups
        # Inverts width = floor(planes * base_width / 64) * cardinality.
        base_width = width // cardinality * 64 // planes
        reduce_first, first_dilation = width // block.conv1.out_channels, block.conv2.dilation[0]
    downsample = None
    if block.downsample is not None:
        # timm's downsample_avg is (pool, conv, norm), downsample_conv is (conv, norm).
        downsample = {"avg": len(block.downsample) == 3, "kernel_size": block.downsample[-2].kernel_size[0]}
    return {"type": type(block).__name__, "inplanes": block.conv1.in_channels, "planes": planes,
            "stride": block.stride, "cardinality": cardinality, "base_width": base_width,
            "reduce_first": reduce_first, "dilation": block.dilation, "first_dilation": first_dilation,
            "downsample": downsample}


def _resnet_block(spec: dict[str, Any]) -> nn.Module:
    cls = _resnet_blocks()[spec["type"]]
    downsample = None
    if spec["downsample"] is not None:
        resnet = _timm("resnet")
        make = resnet.downsample_avg if spec["downsample"]["avg"] else resnet.downsample_conv
        downsample = make(in_channels=spec["inplanes"], out_channels=spec["planes"] * cls.expansion,
                          kernel_size=spec["downsample"]["kernel_size"], stride=spec["stride"],
                          dilation=spec["dilation"], first_dilation=spec["first_dilation"])
    return cls(spec["inplanes"], spec["planes"], stride=spec["stride"], downsample=downsample,
               cardinality=spec["cardinality"], base_width=spec["base_width"], reduce_first=spec["reduce_first"],
               dilation=spec["dilation"], first_dilation=spec["first_dilation"])


def _resnet_stage_spec(stage: nn.Module) -> dict[str, Any]:
    return {"blocks": [_resnet_block_spec(block) for block in stage]}


def _resnet_stage(spec: dict[str, Any]) -> nn.Module:
    return nn.Sequential(*[_resnet_block(b) for b in spec["blocks"]])


def _swin_stage_spec(stage: nn.Module) -> dict[str, Any]:
    if type(stage) is not _timm("swin_transformer").SwinTransformerStage:
        raise ModelError(f"Swin stage {type(stage).__name__} is not a timm SwinTransformerStage")
    block = stage.blocks[0]
    attn = block.attn
    return {"dim": stage.dim, "out_dim": block.dim, "input_resolution": list(stage.input_resolution),
            "depth": len(stage.blocks), "downsample": not isinstance(stage.downsample, nn.Identity),
            "num_heads": attn.num_heads, "head_dim": attn.qkv.out_features // 3 // attn.num_heads,
            # The window as the blocks clamped it to the resolution; the constructor clamps it the same way.
            "window_size": list(block.window_size), "always_partition": block.always_partition,
            "dynamic_mask": block.dynamic_mask, "mlp_ratio": block.mlp_ratio,
            "qkv_bias": attn.qkv.bias is not None}


def _swin_stage(spec: dict[str, Any]) -> nn.Module:
    return _timm("swin_transformer").SwinTransformerStage(
        dim=spec["dim"], out_dim=spec["out_dim"], input_resolution=tuple(spec["input_resolution"]),
        depth=spec["depth"], downsample=spec["downsample"], num_heads=spec["num_heads"], head_dim=spec["head_dim"],
        window_size=tuple(spec["window_size"]), always_partition=spec["always_partition"],
        dynamic_mask=spec["dynamic_mask"], mlp_ratio=spec["mlp_ratio"], qkv_bias=spec["qkv_bias"])


def _convnext_stage_spec(stage: nn.Module) -> dict[str, Any]:
    """Constructor arguments of a timm ConvNeXtStage (LayerNorm, GELU: other variants fail the probe check)."""
    if type(stage) is not _timm("convnext").ConvNeXtStage:
        raise ModelError(f"ConvNeXt stage {type(stage).__name__} is not a timm ConvNeXtStage")
    block = stage.blocks[0]
    downsample = None if isinstance(stage.downsample, nn.Identity) else stage.downsample[1]
    return {"in_chs": downsample.in_channels if downsample is not None else block.conv_dw.in_channels,
            "out_chs": block.conv_dw.out_channels, "kernel_size": block.conv_dw.kernel_size[0],
            "stride": downsample.stride[0] if downsample is not None else 1, "depth": len(stage.blocks),
            "dilation": [downsample.dilation[0] if downsample is not None else 1, block.conv_dw.dilation[0]],
            # The layer-scale gamma comes with the state dict; a placeholder value only makes it exist.
            "layer_scale": block.gamma is not None, "conv_mlp": block.use_conv_mlp,
            "conv_bias": block.conv_dw.bias is not None,
            "use_grn": type(block.mlp).__name__ == "GlobalResponseNormMlp", "norm_eps": block.norm.eps}


def _convnext_stage(spec: dict[str, Any]) -> nn.Module:
    from timm.layers import LayerNorm, LayerNorm2d

    return _timm("convnext").ConvNeXtStage(
        spec["in_chs"], spec["out_chs"], kernel_size=spec["kernel_size"], stride=spec["stride"], depth=spec["depth"],
        dilation=tuple(spec["dilation"]), ls_init_value=1.0 if spec["layer_scale"] else None,
        conv_mlp=spec["conv_mlp"], conv_bias=spec["conv_bias"], use_grn=spec["use_grn"], act_layer="gelu",
        norm_layer=functools.partial(LayerNorm2d, eps=spec["norm_eps"]),
        norm_layer_cl=functools.partial(LayerNorm, eps=spec["norm_eps"]))


def _vit_block_spec(block: nn.Module) -> dict[str, Any]:
    if type(block) is not _timm("vision_transformer").Block:
        raise ModelError(f"ViT block {type(block).__name__} is not a timm vision_transformer.Block")
    dim = block.norm1.normalized_shape[0]
    return {"dim": dim, "num_heads": block.attn.num_heads, "mlp_ratio": block.mlp.fc1.out_features / dim,
            "qkv_bias": block.attn.qkv.bias is not None, "qk_norm": not isinstance(block.attn.q_norm, nn.Identity),
            "proj_bias": block.attn.proj.bias is not None,
            # LayerScale's gamma comes with the state dict; a placeholder value only makes the module exist.
            "layer_scale": not isinstance(block.ls1, nn.Identity), "norm_eps": block.norm1.eps}


def _vit_block(spec: dict[str, Any]) -> nn.Module:
    return _timm("vision_transformer").Block(
        dim=spec["dim"], num_heads=spec["num_heads"], mlp_ratio=spec["mlp_ratio"], qkv_bias=spec["qkv_bias"],
        qk_norm=spec["qk_norm"], proj_bias=spec["proj_bias"], init_values=1.0 if spec["layer_scale"] else None,
        norm_layer=functools.partial(nn.LayerNorm, eps=spec["norm_eps"]))


def _as_is(x: Tensor) -> Tensor:
    return x


def _output_as_is(y: Tensor, x: Tensor) -> Tensor:
    return y


def _to_tokens(x: Tensor) -> Tensor:
    return x.flatten(2).transpose(1, 2)


def _from_tokens(x: Tensor, like: Tensor) -> Tensor:
    b, _, h, w = like.shape
    return x.transpose(1, 2).reshape(b, -1, h, w)


@dataclass(frozen=True)
class _Family:
    """How one timm family's tail is read, rebuilt and fed: its stage names, spec and layout."""

    model: type[nn.Module]
    stage_pattern: str
    read: Callable[[nn.Module], dict[str, Any]]
    build: Callable[[dict[str, Any]], nn.Module]
    to_native: Callable[[Tensor], Tensor]  # NCHW -> the layout the stages take
    from_native: Callable[[Tensor, Tensor], Tensor]  # (stage output, NCHW input) -> NCHW


@functools.cache
def _families() -> dict[str, _Family]:
    return {
        "resnet": _Family(_timm("resnet").ResNet, r"layer\d+", _resnet_stage_spec, _resnet_stage, _as_is,
                          _output_as_is),
        "swin": _Family(_timm("swin_transformer").SwinTransformer, r"layers\.\d+", _swin_stage_spec, _swin_stage,
                        lambda x: x.permute(0, 2, 3, 1), lambda y, x: y.permute(0, 3, 1, 2)),
        "convnext": _Family(_timm("convnext").ConvNeXt, r"stages\.\d+", _convnext_stage_spec, _convnext_stage,
                            _as_is, _output_as_is),
        "vit": _Family(_timm("vision_transformer").VisionTransformer, r"blocks\.\d+", _vit_block_spec, _vit_block,
                       _to_tokens, _from_tokens),
    }


class TeacherTail(nn.Module):
    """The frozen tail: a (B, C, H, W) map in the teacher's previous-stage layout -> (B, Ct, Ht, Wt).

    ``body`` holds the stages in the teacher's own module layout (its state dict is the teacher's, keyed
    ``<stage index>.<module path>``). Always in eval mode, no parameter trains: gradients flow through
    it to its input only.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        if spec.get("format") != TAIL_FORMAT or spec.get("family") not in _families():
            raise ModelError(f"not a teacher tail spec of format {TAIL_FORMAT} (format {spec.get('format')!r}, "
                               f"family {spec.get('family')!r}); re-run `distillery cache` with --teacher-tail")
        self.spec = spec
        self._family = _families()[spec["family"]]
        self.body = nn.Sequential(*[self._family.build(s) for s in spec["modules"]])
        self.requires_grad_(False)
        super().train(False)
        self.input_shape: tuple[int, int, int] = tuple(spec["input_shape"])
        with torch.no_grad():
            self.output_shape: tuple[int, int, int] = tuple(self(torch.zeros(1, *self.input_shape)).shape[1:])

    def train(self, mode: bool = True) -> TeacherTail:
        # The teacher's statistics (BatchNorm running stats) are part of what TPP perceives: never update them.
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        return self._family.from_native(self.body(self._family.to_native(x)), x)


def build_teacher_tail(spec: dict[str, Any], state_dict: dict[str, Tensor] | None = None) -> TeacherTail:
    """Rebuild the tail described by ``spec`` from timm's block classes; load ``state_dict`` if given."""
    tail = TeacherTail(spec)
    if state_dict is not None:
        try:
            tail.body.load_state_dict(state_dict)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise ModelError(f"the teacher tail's weights do not fit its spec ({first}); re-run "
                               f"`distillery cache` into a new --out") from e
    return tail


def check_teacher_tail(spec: Any, state_dict: dict[str, Tensor], output_shape: tuple[int, ...],
                       max_side: int) -> None:
    """Refuse, in one :class:`ModelError`, a stored tail that would allocate more than the cache implies, before
    anything is allocated (docs/cache-format.md#forger): its input map no larger than the teacher's image
    (``max_side``) and than the cached map (``output_shape``) doubled once per stage, its modules built and run
    on the meta device to ``output_shape``, their weights the shapes of the stored ``state_dict`` (bounded by
    the file it was read from), and their other buffers (attention masks) no more elements than those weights.
    A spec of 20,000 planes is then refused from its shapes, not built."""
    def refuse(why: str) -> ModelError:
        return ModelError(f"the teacher tail's spec {why}")

    if not isinstance(spec, dict) or not isinstance(spec.get("modules"), list) or not spec["modules"]:
        raise refuse("lists no modules")
    depth, shape = len(spec["modules"]), spec.get("input_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(d) is int and d >= 1 for d in shape)):
        raise refuse(f"has input_shape {shape!r}, not [channels, height, width]")
    if len(output_shape) != 3 or depth > 64 or any(
            side > min(max_side, out << depth) for side, out in zip(shape[1:], output_shape[1:])):
        raise refuse(f"takes {shape} maps through {depth} modules, more than a {max_side}-px teacher's stages "
                     f"give before its cached {list(output_shape)} maps")
    try:
        with torch.device("meta"):  # shapes only: a forged width allocates nothing here
            tail = TeacherTail(spec)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - any value of a forged spec that timm's constructors refuse
        raise refuse(f"does not build ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})") from None
    if tail.output_shape != tuple(output_shape):
        raise refuse(f"gives {list(tail.output_shape)} maps, not the cached {list(output_shape)}")
    built = {k: tuple(v.shape) for k, v in tail.body.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, Tensor)}
    if built != stored:
        differ = sorted(k for k in built.keys() | stored.keys() if built.get(k) != stored.get(k))
        raise refuse(f"implies other weights than the stored ones ({len(differ)} differ, e.g. {differ[0]}: "
                     f"{built.get(differ[0])} built, {stored.get(differ[0])} stored)")
    weights = sum(math.prod(s) for s in stored.values())
    buffers = sum(b.numel() for b in tail.body.buffers()) - sum(
        math.prod(built[k]) for k, _ in tail.body.named_buffers() if k in built)
    if buffers > weights:
        raise refuse(f"implies {buffers:,} buffer elements (attention masks), more than its {weights:,} weights")


def _family_of(model: nn.Module) -> str:
    for name, family in _families().items():
        if isinstance(model, family.model):
            return name
    raise ModelError(f"ScaleKD's TPP rebuilds teacher tails of timm ResNet, Swin, ConvNeXt and ViT models only, not a "
                       f"{type(model).__name__}; cache without --teacher-tail and train scalekd with tpp=false")


def extract_teacher_tail(model: nn.Module, tap: str, stages: int,
                         probe: Tensor) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Spec and state dict of the ``stages`` stages of ``model`` ending at ``tap`` (docs/methods.md#scalekd TPP).

    ``probe`` is a small input batch at the teacher's input size: running it through ``model`` gives the
    shape that enters the tail, and the rebuilt tail must reproduce the teacher's stages on it exactly
    (else :class:`ModelError`: a variant the builders do not cover).
    """
    name = _family_of(model)
    family = _families()[name]
    names = stage_names(model)
    index = names.index(tap)
    available = 0
    while available <= index and re.fullmatch(family.stage_pattern, names[index - available]):
        available += 1
    if not 1 <= stages <= available:
        raise ModelError(f"--teacher-tail must be 1..{available} for tap {tap} (the {type(model).__name__} stages "
                           f"up to it: {', '.join(names[index - available + 1: index + 1])}), not {stages}")
    chosen = names[index - stages + 1: index + 1]
    modules = [model.get_submodule(n) for n in chosen]
    entered: list[Tensor] = []
    hook = modules[0].register_forward_pre_hook(lambda module, args: entered.append(args[0]))
    try:
        with torch.inference_mode():
            model.forward_features(probe)
    finally:
        hook.remove()
    native = entered[0].clone()
    if name == "vit":
        # Prefix (class) tokens come first; the tail's NCHW input is the spatial grid after them.
        input_shape = [native.shape[-1], *model.patch_embed.dynamic_feat_size(tuple(probe.shape[-2:]))]
    elif name == "swin":
        input_shape = [native.shape[-1], *native.shape[1:3]]
    else:
        input_shape = list(native.shape[1:])
    spec = {"format": TAIL_FORMAT, "family": name, "stages": chosen, "input_shape": input_shape,
            "modules": [family.read(m) for m in modules]}
    original = nn.Sequential(*modules)
    state = {k: v.detach().cpu().clone() for k, v in original.state_dict().items()}
    unsupported = ModelError(f"the tail stage(s) {', '.join(chosen)} of this {type(model).__name__} are a variant "
                               f"that timm's block classes do not rebuild as is; cache without --teacher-tail and "
                               f"train scalekd with tpp=false")
    try:
        tail = build_teacher_tail(spec, state).to(native.device)
        with torch.inference_mode():
            reference, rebuilt = original(native), tail.body(native)
    except (ModelError, RuntimeError) as e:  # weights or shapes that do not fit the rebuilt modules
        raise unsupported from e
    if rebuilt.shape != reference.shape or not torch.allclose(rebuilt, reference, rtol=1e-4, atol=1e-5):
        raise unsupported
    return spec, state
