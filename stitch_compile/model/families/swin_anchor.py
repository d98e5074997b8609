"""Swin anchors as the public code saved them (Microsoft Swin / timm 0.6 layout), run as timm 1.x Swin.

Key layout, remapped explicitly (public name <- timm name, see ``public_name``):
- ``layers.i.downsample.*`` <- ``layers.{i+1}.downsample.*``: the public code merges patches at the
  end of stage i, timm at the start of stage i+1 (same 2x2 concatenation order x00, x10, x01, x11).
- ``head.*`` <- ``head.fc.*``.
- ``layers.i.blocks.j.attn.relative_position_index`` and ``layers.i.blocks.j.attn_mask`` are saved by
  the public code but recomputed by timm: they must equal timm's values, which pins window, shift and
  resolution. The masks also give the image size (``nW = (grid / window)^2``); without any, 224.
Activations are NHWC (B, H, W, C) between segments where the public code has tokens (B, H*W, C):
the same row-major order, so token Linear stitching, norms and pooling act identically.

FLOPs follow fvcore (the published tables): convs, linears, q.k^T and attn.v over (padded) windows,
5 per LayerNorm element; the relative-position bias, masks, softmax and pooling are not counted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from ...errors import StitchError
from ..network import Segment
from .flops import LAYER_NORM, conv_flops, linear_flops
from .staged import StagedAnchor
from .timm_anchor import anchor_model, count_params
from .vit_anchor import load_into

MARKER = "layers.0.blocks.0.attn.relative_position_bias_table"
DEFAULT_IMG = 224  # the public training resolution, used when no shifted-window mask tells otherwise


@dataclass(frozen=True)
class SwinSpec:
    """What a public Swin checkpoint says about its architecture."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    patch_size: int
    img_size: int
    in_chans: int
    num_classes: int
    mlp_ratio: float
    qkv_bias: bool

    @property
    def name(self) -> str:
        return f"swin_d{self.embed_dim}_{'-'.join(map(str, self.depths))}_w{self.window_size}_{self.img_size}"


def public_name(key: str) -> str:
    """The public code's name for timm Swin tensor ``key``."""
    m = re.match(r"layers\.(\d+)\.downsample\.(.+)", key)
    if m:
        return f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
    return "head." + key[len("head.fc."):] if key.startswith("head.fc.") else key


def detect_swin(state: dict[str, torch.Tensor], where: str) -> SwinSpec:
    """Describe the Swin whose (prefix-stripped) tensors are ``state``."""
    need = ("patch_embed.proj.weight", MARKER, "layers.0.blocks.0.mlp.fc1.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise StitchError(f"{where}: not a Swin anchor: missing {where}.{missing[0]}")
    proj = state["patch_embed.proj.weight"]
    blocks = {}
    for key in state:
        m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    depths = tuple(len(blocks.get(i, ())) for i in range(max(blocks) + 1))
    tables = [state.get(f"layers.{i}.blocks.0.attn.relative_position_bias_table") for i in range(len(depths))]
    if any(t is None or t.ndim != 2 for t in tables):
        raise StitchError(f"{where}: every Swin stage needs layers.<i>.blocks.0.attn.relative_position_bias_table [(2w-1)^2, heads]")
    windows = [_window(t, f"{where}.layers.{i}.blocks.0.attn.relative_position_bias_table") for i, t in enumerate(tables)]
    head = state.get("head.weight")
    return SwinSpec(
        embed_dim=proj.shape[0], depths=depths, num_heads=tuple(t.shape[1] for t in tables),
        window_size=max(windows), patch_size=proj.shape[-1], img_size=_image_size(state, windows, proj.shape[-1]),
        in_chans=proj.shape[1], num_classes=head.shape[0] if head is not None else 0,
        mlp_ratio=state["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / proj.shape[0],
        qkv_bias="layers.0.blocks.0.attn.qkv.bias" in state,
    )


def _window(table: torch.Tensor, name: str) -> int:
    side = math.isqrt(table.shape[0])
    if side * side != table.shape[0] or side % 2 == 0:
        raise StitchError(f"{name}: {table.shape[0]} rows is not (2w-1)^2 for a square window w")
    return (side + 1) // 2


def _image_size(state: dict[str, torch.Tensor], windows: list[int], patch: int) -> int:
    """From the first shifted-window mask [nW, w*w, w*w] of stage i: grid_i = sqrt(nW) * w_i."""
    for key, mask in state.items():
        m = re.match(r"layers\.(\d+)\.blocks\.\d+\.attn_mask$", key)
        if m:
            stage = int(m.group(1))
            return math.isqrt(mask.shape[0]) * windows[stage] * 2 ** stage * patch
    return DEFAULT_IMG


def build_swin(spec: SwinSpec) -> SwinTransformer:
    return SwinTransformer(
        img_size=spec.img_size, patch_size=spec.patch_size, in_chans=spec.in_chans, num_classes=spec.num_classes,
        embed_dim=spec.embed_dim, depths=spec.depths, num_heads=spec.num_heads, window_size=spec.window_size,
        mlp_ratio=spec.mlp_ratio, qkv_bias=spec.qkv_bias, drop_path_rate=0.0, weight_init="skip",
    )


class SwinHead(nn.Module):
    """Final norm, average pool over the grid, classifier (the public head keeps the norm)."""

    def __init__(self, swin: SwinTransformer):
        super().__init__()
        self.norm, self.head = swin.norm, swin.head

    def forward(self, x):
        return self.head(self.norm(x))


def swin_anchor(a: int, state: dict[str, torch.Tensor], where: str, named: str | None, family: str) -> StagedAnchor:
    """Build, load and segment anchor ``a``; ``named`` is an ``--anchors`` override."""
    spec = None if named else detect_swin(state, where)
    model = anchor_model(lambda: build_swin(spec), named, SwinTransformer, family)
    load_into(model, state, where, public_name)
    return swin_segments(a, model, named or spec.name)


def swin_segments(a: int, swin: SwinTransformer, name: str) -> StagedAnchor:
    """Stem, patch merging, blocks and head of anchor ``a`` with fvcore-convention FLOPs."""
    pe = swin.patch_embed
    grid = tuple(pe.grid_size)
    widths = [info["num_chs"] for info in swin.feature_info]
    stem_flops = conv_flops(pe.proj, grid) + (LAYER_NORM * math.prod(grid) * widths[0] if isinstance(pe.norm, nn.LayerNorm) else 0)
    segs = {f"stem:{a}": Segment(f"stem:{a}", pe, (pe.proj.in_channels, *pe.img_size), stem_flops, count_params(pe))}
    shapes = []
    for s, stage in enumerate(swin.layers):
        out = (*stage.output_resolution, widths[s])
        if s:
            n_out, down = math.prod(stage.output_resolution), stage.downsample
            flops = LAYER_NORM * n_out * down.norm.normalized_shape[0] + linear_flops(down.reduction, n_out)
            segs[f"down:{a}:{s}"] = Segment(f"down:{a}:{s}", down, shapes[-1], flops, count_params(down))
        for i, blk in enumerate(stage.blocks):
            segs[f"block:{a}:{s}.{i}"] = Segment(f"block:{a}:{s}.{i}", blk, out, _block_flops(blk, stage.output_resolution), count_params(blk))
        shapes.append(out)
    n = math.prod(shapes[-1][:2])
    head = SwinHead(swin)
    head_flops = LAYER_NORM * n * widths[-1] + linear_flops(swin.head.fc)
    segs[f"head:{a}"] = Segment(f"head:{a}", head, shapes[-1], head_flops, count_params(head))
    spec = {"kind": "swin", "embed_dim": widths[0], "depths": [len(st.blocks) for st in swin.layers],
            "img_size": list(pe.img_size), "num_classes": swin.num_classes}
    return StagedAnchor(a, swin, name, tuple(spec["depths"]), tuple(shapes), tuple(widths), segs, spec)


def _block_flops(blk: nn.Module, grid: tuple[int, int]) -> int:
    """Two LayerNorms, the four linears, and q.k^T + attn.v over the (padded) windows."""
    n, dim = math.prod(grid), blk.norm1.normalized_shape[0]
    attn_dim = blk.attn.qkv.out_features // 3
    padded = math.prod(-(-g // w) * w for g, w in zip(grid, blk.window_size))
    linears = sum(linear_flops(m, n) for m in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2))
    return 2 * LAYER_NORM * n * dim + linears + 2 * padded * blk.window_area * attn_dim
