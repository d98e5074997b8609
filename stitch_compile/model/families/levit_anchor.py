"""LeViT anchors as the public code saved them (Facebook LeViT layout), run as timm 1.x ``Levit``.

The public LeViT keeps one flat ``blocks`` list: per stage, residual (attention, MLP) pairs, and
between stages an attention-subsample followed by a residual MLP. timm groups the same modules by
stage; ``public_name`` maps each timm key to the public one (the only remapping):
- ``stem.conv<m>.{linear,bn}`` <- ``patch_embed.<2(m-1)>.{c,bn}``
- ``stages.<s>.blocks.<i>.attn.*`` / ``.mlp.*`` <- ``blocks.<n>.m.*`` / ``blocks.<n+1>.m.*``
- ``stages.<s>.downsample.attn_downsample.*`` / ``.mlp.*`` <- ``blocks.<n>.*`` / ``blocks.<n+1>.m.*``
- inside those: ``linear`` <- ``c``, ``proj.ln`` / ``q.ln`` <- ``proj.1`` / ``q.1``, ``ln1`` / ``ln2`` <- ``0`` / ``2``
- ``head{,_dist}.linear`` <- ``head{,_dist}.l``
Both index attention biases by |dy| * res + |dx| (the public code's first-seen order of offsets
enumerates them the same way); the saved ``attention_bias_idxs`` must equal timm's. A stitch
position (stage s, block j) is the public ``blocks[: s*10 + 2(j+1)]``: for depth-4 stages, stage s
block j; we use the structure (stage offsets from the actual depths), which is identical there.

FLOPs follow fvcore: linears and convs, eval-mode BatchNorm 2 per element, q.k^T and attn.v; the
two heads of a distilled LeViT are both counted; Hardswish, softmax, biases and mean are free.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
from timm.models.levit import Levit, LevitDistilled
from torch import nn

from ...errors import StitchError
from ..network import Segment
from .flops import BATCH_NORM, conv_flops, conv_out, linear_flops
from .staged import StagedAnchor
from .timm_anchor import anchor_model, count_params
from .vit_anchor import load_into

MARKER = "blocks.0.m.qkv.c.weight"
TOKENS = {"linear": "c", "ln": "1", "ln1": "0", "ln2": "2"}  # timm -> public, inside a block


@dataclass(frozen=True)
class LevitSpec:
    """What a public LeViT checkpoint says about its architecture."""

    embed_dim: tuple[int, ...]
    depth: tuple[int, ...]
    num_heads: tuple[int, ...]
    key_dim: int
    attn_ratio: tuple[float, ...]
    mlp_ratio: tuple[float, ...]
    stem_convs: int
    img_size: int
    in_chans: int
    num_classes: int
    distilled: bool

    @property
    def name(self) -> str:
        return f"levit_{'-'.join(map(str, self.embed_dim))}_{self.img_size}"


def public_namer(depths: tuple[int, ...]) -> Callable[[str], str]:
    """timm key -> public key for a LeViT whose stages have ``depths`` blocks."""
    prefixes, n = {f"stem.conv{m}.": f"patch_embed.{2 * (m - 1)}." for m in range(1, 5)}, 0
    prefixes.update({"head.linear.": "head.l.", "head_dist.linear.": "head_dist.l."})
    for s, depth in enumerate(depths):
        if s:
            prefixes[f"stages.{s}.downsample.attn_downsample."] = f"blocks.{n}."
            prefixes[f"stages.{s}.downsample.mlp."] = f"blocks.{n + 1}.m."
            n += 2
        for i in range(depth):
            prefixes[f"stages.{s}.blocks.{i}.attn."] = f"blocks.{n}.m."
            prefixes[f"stages.{s}.blocks.{i}.mlp."] = f"blocks.{n + 1}.m."
            n += 2

    def public_name(key: str) -> str:
        for timm_prefix, public in prefixes.items():
            if key.startswith(timm_prefix):
                rest = key[len(timm_prefix):]
                return public + (rest if public.startswith("head") else ".".join(TOKENS.get(t, t) for t in rest.split(".")))
        return key
    return public_name


def detect_levit(state: dict[str, torch.Tensor], where: str) -> LevitSpec:
    """Describe the LeViT whose (prefix-stripped) tensors are ``state`` by walking its flat blocks."""
    for key in ("patch_embed.0.c.weight", MARKER):
        if key not in state:
            raise StitchError(f"{where}: not a LeViT anchor: missing {where}.{key}")
    stages, n = [[]], 0
    while f"blocks.{n}.m.qkv.c.weight" in state or f"blocks.{n}.kv.c.weight" in state:
        if f"blocks.{n}.kv.c.weight" in state:
            stages.append([])  # attention-subsample: a new stage starts after its MLP
        else:
            stages[-1].append(n)
        if f"blocks.{n + 1}.m.0.c.weight" not in state:
            raise StitchError(f"{where}: blocks.{n} is not followed by an MLP residual (missing {where}.blocks.{n + 1}.m.0.c.weight); "
                              "not the public LeViT layout")
        n += 2
    if any(not blocks for blocks in stages):
        raise StitchError(f"{where}: a LeViT stage without attention blocks; not the public LeViT layout")
    firsts = [f"blocks.{blocks[0]}.m." for blocks in stages]
    dims = [state[p + "qkv.c.weight"].shape[1] for p in firsts]
    heads = [state[p + "attention_biases"].shape[0] for p in firsts]
    proj_in = [state[p + "proj.1.c.weight"].shape[1] for p in firsts]
    key_dims = {(state[p + "qkv.c.weight"].shape[0] - v) // (2 * h) for p, v, h in zip(firsts, proj_in, heads)}
    if len(key_dims) != 1:
        raise StitchError(f"{where}: LeViT stages with different key dims {sorted(key_dims)}; timm's Levit has one")
    key_dim = key_dims.pop()
    stem_convs = len([k for k in state if re.fullmatch(r"patch_embed\.\d+\.c\.weight", k)])
    grid = math.isqrt(state[firsts[0] + "attention_biases"].shape[1])
    head = state.get("head.l.weight")
    return LevitSpec(
        embed_dim=tuple(dims), depth=tuple(len(b) for b in stages), num_heads=tuple(heads), key_dim=key_dim,
        attn_ratio=tuple(v / (h * key_dim) for v, h in zip(proj_in, heads)),
        mlp_ratio=tuple(state[f"blocks.{b[0] + 1}.m.0.c.weight"].shape[0] / d for b, d in zip(stages, dims)),
        stem_convs=stem_convs, img_size=grid * 2 ** stem_convs, in_chans=state["patch_embed.0.c.weight"].shape[1],
        num_classes=head.shape[0] if head is not None else 0, distilled="head_dist.l.weight" in state,
    )


def build_levit(spec: LevitSpec) -> Levit:
    if spec.stem_convs not in (3, 4):
        raise StitchError(f"LeViT stem with {spec.stem_convs} convs: timm builds stride-8 (3) or stride-16 (4) stems only")
    return (LevitDistilled if spec.distilled else Levit)(
        img_size=spec.img_size, in_chans=spec.in_chans, num_classes=spec.num_classes, embed_dim=spec.embed_dim,
        key_dim=spec.key_dim, depth=spec.depth, num_heads=spec.num_heads, attn_ratio=spec.attn_ratio,
        mlp_ratio=spec.mlp_ratio, stem_type="s16" if spec.stem_convs == 4 else "s8", act_layer="hard_swish",
    )


class LevitStem(nn.Module):
    """Conv stem, then the feature map as tokens (B, H*W, C)."""

    def __init__(self, levit: Levit):
        super().__init__()
        self.stem = levit.stem

    def forward(self, x):
        return self.stem(x).flatten(2).transpose(1, 2)


class LevitHead(nn.Module):
    """Mean over tokens, classifier; a distilled LeViT averages its two heads in eval (as the public code)."""

    def __init__(self, levit: Levit):
        super().__init__()
        self.head = levit.head
        self.head_dist = getattr(levit, "head_dist", None)

    def forward(self, x):
        x = x.mean(1)
        return self.head(x) if self.head_dist is None else (self.head(x) + self.head_dist(x)) / 2


def levit_anchor(a: int, state: dict[str, torch.Tensor], where: str, named: str | None, family: str) -> StagedAnchor:
    """Build, load and segment anchor ``a``; ``named`` is an ``--anchors`` override."""
    spec = None if named else detect_levit(state, where)
    model = anchor_model(lambda: build_levit(spec), named, Levit, family)
    if model.use_conv:
        raise StitchError(f"--anchors {named!r}: a conv-mode LeViT; the public LeViT checkpoints are linear-mode (levit_*)")
    load_into(model, state, where, public_namer(tuple(len(st.blocks) for st in model.stages)))
    return levit_segments(a, model, named or spec.name)


def levit_segments(a: int, levit: Levit, name: str) -> StagedAnchor:
    """Stem, attention-subsample stages, blocks and head of anchor ``a`` with fvcore-convention FLOPs."""
    stem = LevitStem(levit)
    img = levit.stages[0].blocks[0].attn.resolution[0] * levit.stem.stride
    grid, stem_flops = (img, img), 0
    for conv in (m.linear for m in levit.stem if hasattr(m, "linear")):  # ConvNorm: conv, then BatchNorm
        grid = conv_out(grid, conv)
        stem_flops += conv_flops(conv, grid) + BATCH_NORM * conv.out_channels * math.prod(grid)
    segs = {f"stem:{a}": Segment(f"stem:{a}", stem, (levit.in_chans, img, img), stem_flops, count_params(stem))}
    shape, shapes = (math.prod(grid), levit.embed_dim[0]), []
    for s, stage in enumerate(levit.stages):
        if s:
            down = stage.downsample
            n_out = math.prod(-(-r // down.attn_downsample.stride) for r in down.attn_downsample.resolution)
            flops = _attention_flops(down.attn_downsample, shape[0], n_out) + _mlp_flops(down.mlp, n_out)
            segs[f"down:{a}:{s}"] = Segment(f"down:{a}:{s}", down, shape, flops, count_params(down))
            shape = (n_out, levit.embed_dim[s])
        for i, blk in enumerate(stage.blocks):
            flops = _attention_flops(blk.attn, shape[0], shape[0]) + _mlp_flops(blk.mlp, shape[0])
            segs[f"block:{a}:{s}.{i}"] = Segment(f"block:{a}:{s}.{i}", blk, shape, flops, count_params(blk))
        shapes.append(shape)
    head = LevitHead(levit)
    head_flops = sum(BATCH_NORM * h.bn.num_features + linear_flops(h.linear)
                     for h in (head.head, head.head_dist) if hasattr(h, "linear"))
    segs[f"head:{a}"] = Segment(f"head:{a}", head, shape, head_flops, count_params(head))
    depths = tuple(len(st.blocks) for st in levit.stages)
    spec = {"kind": "levit", "embed_dim": list(levit.embed_dim), "depths": list(depths), "img_size": [img, img],
            "num_classes": levit.num_classes}
    return StagedAnchor(a, levit, name, depths, tuple(shapes), tuple(levit.embed_dim), segs, spec)


def _linear_norm_flops(ln: nn.Module, n: int) -> int:
    """Linear (no bias) then BatchNorm over ``n`` tokens."""
    return linear_flops(ln.linear, n) + BATCH_NORM * n * ln.linear.out_features


def _attention_flops(attn: nn.Module, n_in: int, n_out: int) -> int:
    """Attention (n_out = n_in) or attention-subsample: projections, q.k^T and attn.v."""
    matmuls = attn.num_heads * n_out * n_in * (attn.key_dim + attn.val_dim)
    if hasattr(attn, "qkv"):
        return _linear_norm_flops(attn.qkv, n_in) + matmuls + _linear_norm_flops(attn.proj.ln, n_out)
    return (_linear_norm_flops(attn.kv, n_in) + _linear_norm_flops(attn.q.ln, n_out) + matmuls
            + _linear_norm_flops(attn.proj.ln, n_out))


def _mlp_flops(mlp: nn.Module, n: int) -> int:
    return _linear_norm_flops(mlp.ln1, n) + _linear_norm_flops(mlp.ln2, n)
