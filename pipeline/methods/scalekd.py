"""ScaleKD: cross-attention projection, dual-view feature mimicking, teacher parameter perception (docs/methods.md#scalekd).

The student's map at ``stage`` (its deepest by default) goes through a CAP (cross-attention
projector) into the layout of the cached teacher map of the same view (attention logits
``attention_scale * q.k / sqrt(d)``, 5 by default as in the official code), and DFM (dual-view feature
mimicking) compares the two: the *direct* view

    L_dir(P, T) = sum_{h,w} || norm_c(P)_{hw} - norm_c(T)_{hw} ||^2 / N        (norm_c: L2 over channels)

and the *alternative* view, the same after removing the DC component of each channel's 2D DCT (which is
each channel's spatial mean, see :func:`remove_dc`), so the large shared component does not drown the
rest. Each view has its own CAP. With ``tpp=true`` (teacher parameter perception) the student's
stage before ``stage`` is projected, by two more CAPs, into the layout that enters the teacher's last stage(s),
run through those frozen stages (the cache's ``teacher_tail.pt``; the teacher is never built), and the
outputs are mimicked the same two ways; with ``tpp_queries`` (the default, as in the official Swin-teacher
configs) those tail outputs are the queries of the final CAPs instead of learned ones. A logit KD term (docs/methods.md#kd, ``T=1`` as in the reference configs)
is added when the cache stores logits.

The projectors train with the student and are dropped afterwards: the run saves the plain student. What still
differs from the paper and its official code: docs/methods.md#scalekd-deviations.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.nets.tail import TeacherTail, build_teacher_tail
from pipeline.options import Help, Range

from .base import (
    FEATMAPS,
    LOGITS,
    CacheInfo,
    Method,
    MethodError,
    StudentInfo,
    StudentOutputs,
    Targets,
    TrainingProgress,
    at_least_float32,
    register_method,
)
from .kd import kd_loss


def remove_dc(x: Tensor) -> Tensor:
    """``x`` (..., H, W) without the DC component of its orthonormal 2D DCT-II per channel (docs/methods.md#scalekd).

    The DC basis function is constant, so zeroing its coefficient and inverting subtracts the
    projection onto a constant: the channel's spatial mean.
    """
    return x - x.mean(dim=(-2, -1), keepdim=True)


def dfm_direct(projected: Tensor, target: Tensor) -> Tensor:
    """DFM's direct view: ``sum_{h,w} ||norm_c(P) - norm_c(T)||^2 / N`` over (N, C, H, W) maps (docs/methods.md#scalekd)."""
    p = F.normalize(at_least_float32(projected), dim=1)
    t = F.normalize(at_least_float32(target), dim=1)
    return (p - t).pow(2).sum() / p.shape[0]


def dfm_alternative(projected: Tensor, target: Tensor) -> Tensor:
    """DFM's alternative view: the direct view after :func:`remove_dc` on both maps (docs/methods.md#scalekd)."""
    return dfm_direct(remove_dc(at_least_float32(projected)), remove_dc(at_least_float32(target)))


class ScaledCrossAttention(nn.Module):
    """Multi-head cross-attention whose logits are ``scale * q.k / sqrt(d_head)`` (docs/methods.md#scalekd).

    ``scale`` = 1 is ``nn.MultiheadAttention``; the official ScaleKD projector multiplies by 5 (its Swin-teacher
    configs), which sharpens each query's weights over the student's positions.
    """

    def __init__(self, width: int, key_width: int, heads: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.scale = heads, scale
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(key_width, width), nn.Linear(key_width, width)
        self.out = nn.Linear(width, width)

    def forward(self, queries: Tensor, keys: Tensor) -> Tensor:
        """(B, Lq, width) queries over (B, Lk, key_width) keys (which are also the values) -> (B, Lq, width)."""
        def split(x: Tensor) -> Tensor:
            return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        q, k, v = split(self.q(queries)), split(self.k(keys)), split(self.v(keys))
        attended = F.scaled_dot_product_attention(q, k, v, scale=self.scale / math.sqrt(q.shape[-1]))
        return self.out(attended.transpose(1, 2).flatten(2))


class CrossAttentionProjector(nn.Module):
    """CAP (docs/methods.md#scalekd): a student map (B, Cs, Hs, Ws) -> (B, Ct, Hq, Wq), the teacher's layout.

    Keys/values: the student map through conv3x3+BN+ReLU plus a learnable positional embedding, one token
    per position. Queries: a learnable (Ct, Hq, Wq) grid, or one given per sample (``learned_queries=False``:
    the official ScaleKD feeds the TPP path's output there), one token per teacher position, through
    conv1x1+ReLU. One multi-head cross-attention with logits scaled by ``attention_scale`` (no residual around
    it: the output must not keep the queries' content), LayerNorm, then a residual MLP with 4x hidden width.
    Every step after the attention acts per token, so output position (h, w) is the attention result of query (h, w).
    """

    def __init__(self, student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int], heads: int,
                 attention_scale: float = 1.0, learned_queries: bool = True) -> None:
        super().__init__()
        cs, hs, ws = student_shape
        ct, hq, wq = teacher_shape
        self.teacher_shape = teacher_shape
        self.student_proj = nn.Sequential(nn.Conv2d(cs, cs, 3, padding=1), nn.BatchNorm2d(cs), nn.ReLU())
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, cs, hs, ws), std=0.02))
        self.queries = (nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, ct, hq, wq), std=0.02))
                        if learned_queries else None)
        self.query_proj = nn.Sequential(nn.Conv2d(ct, ct, 1), nn.ReLU())
        # The head count must divide the teacher's width; gcd keeps it at most `heads`.
        self.attention = ScaledCrossAttention(ct, cs, math.gcd(ct, heads), attention_scale)
        self.norm = nn.LayerNorm(ct)
        self.mlp = nn.Sequential(nn.Linear(ct, 4 * ct), nn.ReLU(), nn.Linear(4 * ct, ct))

    def forward(self, x: Tensor, queries: Tensor | None = None) -> Tensor:
        """``queries`` (B, Ct, Hq, Wq): given per sample, required when the projector has no learned ones."""
        b = x.shape[0]
        keys = (self.student_proj(x) + self.pos_embed).flatten(2).transpose(1, 2)
        grid = queries if queries is not None else self.queries.expand(b, -1, -1, -1)
        attended = self.attention(self.query_proj(grid).flatten(2).transpose(1, 2), keys)
        y = self.norm(attended)
        y = y + self.mlp(y)
        return y.transpose(1, 2).reshape(b, *self.teacher_shape)


@register_method
class ScaleKD(Method):
    """``direct * L_dir + alternative * L_alt`` between CAP-projected student maps and the cached teacher
    maps, the same two terms through the frozen teacher tail with ``tpp=true``, plus ``kd * T^2 KL`` on
    logits when the cache stores them (``kd=0`` turns it off). Defaults (0.08, 0.06), ``T=1`` and
    ``kd=0.5`` are the reference configs' (docs/methods.md#scalekd); there CE is weighted 0.5 as well (``ce:weight=0.5``).
    ``attention_scale=5`` and, with TPP, ``tpp_queries=true`` are the official code's (its Swin-teacher configs).
    ``stage`` is the student stage mimicked (-1, the deepest; TPP reads ``stage - 1``); a 1x1 student map
    against a larger teacher map is refused, since no projection of one position varies over several.
    """

    name = "scalekd"
    needs = frozenset({FEATMAPS})
    trains_logits = True

    def __init__(
        self,
        cache: CacheInfo,
        student: StudentInfo,
        *,
        direct: Annotated[float, Range(ge=0, le=1e4), Help("weight of the direct feature-mimicking term")] = 0.08,
        alternative: Annotated[float, Range(ge=0, le=1e4), Help("weight of the alternative (mean-removed) term")] = 0.06,
        heads: Annotated[int, Range(ge=1, le=64), Help("attention heads of the cross-attention projector")] = 8,
        attention_scale: Annotated[float, Range(ge=0.01, le=100), Help(
            "factor on the projectors' attention logits, beyond 1/sqrt(head width) (official: 5; 1: plain)")] = 5.0,
        tpp: Annotated[bool, Help("also mimic through the cached teacher tail (needs --teacher-tail)")] = False,
        tpp_queries: Annotated[bool, Help(
            "with tpp: the final projectors query with the TPP path's outputs (official); false: learned queries")] = True,
        kd: Annotated[float, Range(ge=0, le=1e4), Help("weight of its KD term on logits (0: off; only with cached logits)")] = 0.5,
        T: Annotated[float, Range(ge=0.01, le=100), Help("temperature of its KD term")] = 1.0,
        stage: Annotated[int, Help("student stage mimicked, from the deepest (-1; TPP reads stage - 1)")] = -1,
    ) -> None:
        super().__init__(cache, student)
        taps = self.taps_for({"stage": stage, "tpp": tpp})  # the same refusal as when the run picks its taps
        if FEATMAPS not in cache.target_shapes:
            raise MethodError("method 'scalekd' needs the shape of the cached teacher feature maps "
                              "(CacheInfo.target_shapes)")
        teacher_shape: tuple[int, int, int] = tuple(cache.target_shapes[FEATMAPS])
        self.final_stage = student.taps[taps[-1]]
        final_shape = student.feature_shapes[self.final_stage]
        if final_shape[1] * final_shape[2] == 1 < teacher_shape[1] * teacher_shape[2]:
            # One key: the attention returns the same token for every query, so the projection is constant
            # over positions and the alternative view (each channel minus its spatial mean) is 0 / 0.
            raise MethodError(
                f"method 'scalekd': the student's map at stage {stage} ({self.final_stage}) is 1x1, so its "
                f"projection cannot vary over the teacher's {teacher_shape[1]}x{teacher_shape[2]} positions; "
                f"mimic with an earlier stage (scalekd:stage={stage - 1}) or train with a larger --input-size")
        self.direct, self.alternative, self.tpp, self.T = direct, alternative, tpp, T
        self.tpp_queries = tpp and tpp_queries
        learned = not self.tpp_queries
        self.cap_direct = CrossAttentionProjector(final_shape, teacher_shape, heads, attention_scale, learned)
        self.cap_alternative = CrossAttentionProjector(final_shape, teacher_shape, heads, attention_scale, learned)
        if tpp:
            tail = self._load_tail(cache, teacher_shape)
            self.early_stage = student.taps[taps[0]]
            early_shape = student.feature_shapes[self.early_stage]
            self.tpp_direct = CrossAttentionProjector(early_shape, tail.input_shape, heads, attention_scale)
            self.tpp_alternative = CrossAttentionProjector(early_shape, tail.input_shape, heads, attention_scale)
            # Not a submodule: its weights come from the cache, so they stay out of the optimiser, the run's
            # checkpoints and train(); `_apply` still moves it with the method.
            object.__setattr__(self, "_tail", tail)
        self.kd = kd if LOGITS in cache.available else 0.0
        if self.kd:
            # The term needs logits served; shadows the class attribute for this instance only.
            self.needs = type(self).needs | {LOGITS}

    @staticmethod
    def _load_tail(cache: CacheInfo, teacher_shape: tuple[int, int, int]) -> TeacherTail:
        if cache.teacher_tail is None:
            raise MethodError("scalekd with tpp=true needs the cache's teacher tail, but none is given; train "
                              "from a cache made with --featmaps --teacher-tail N")
        tail = build_teacher_tail(*cache.teacher_tail())
        if tail.output_shape != teacher_shape:
            raise MethodError(f"the cache's teacher tail gives {tail.output_shape} maps but its feature maps are "
                              f"{teacher_shape}; re-run `distillery cache` into a new --out")
        return tail

    @classmethod
    def trains_classifier(cls, options: Mapping[str, bool | int | float | str]) -> bool:
        """Only through its KD term: ``kd > 0`` (and logits cached, which the run cannot know yet)."""
        return float(options.get("kd", cls.options()["kd"])) > 0

    @classmethod
    def taps_for(cls, options: Mapping[str, bool | int | float | str]) -> tuple[int, ...]:
        """``(stage,)``, or ``(stage - 1, stage)`` with TPP (its projectors read the stage before)."""
        stage = cls.stage_option(options)
        return (stage - 1, stage) if options.get("tpp", False) else (stage,)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - torch's own signature
        if self.tpp:
            self._tail._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def forward(
        self, student: StudentOutputs, targets: Targets, labels: Tensor, progress: TrainingProgress
    ) -> dict[str, Tensor]:
        teacher = targets[FEATMAPS]
        final = student.feature_maps[self.final_stage]
        terms: dict[str, Tensor] = {}
        queries_direct = queries_alternative = None
        if self.tpp:
            early = student.feature_maps[self.early_stage]
            tpp_direct = self._tail(self.tpp_direct(early))
            tpp_alternative = self._tail(self.tpp_alternative(early))
            terms["scalekd_tpp_direct"] = self.direct * dfm_direct(tpp_direct, teacher)
            terms["scalekd_tpp_alt"] = self.alternative * dfm_alternative(tpp_alternative, teacher)
            if self.tpp_queries:
                # Not detached, as in the official code: the final terms also train the TPP projectors.
                queries_direct, queries_alternative = tpp_direct, tpp_alternative
        terms["scalekd_direct"] = self.direct * dfm_direct(self.cap_direct(final, queries_direct), teacher)
        terms["scalekd_alt"] = self.alternative * dfm_alternative(
            self.cap_alternative(final, queries_alternative), teacher)
        if self.kd:
            terms["scalekd_kd"] = self.kd * kd_loss(student.logits, targets[LOGITS], self.T)
        return terms
