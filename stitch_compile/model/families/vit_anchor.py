"""ViT anchors (DeiT, DeiT-3, learngene instances): detection, building, segments, FLOPs.

An anchor is described from its checkpoint tensors alone (width, depth, patch and image size,
classes, position-embedding layout, LayerScale) and built as a timm ``VisionTransformer`` that
holds the checkpoint's weights. Nothing is ever downloaded: timm is only used for its modules.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ...errors import StitchError, first_line
from ..network import Segment
from .stitching import stitch_segment as token_stitch_segment

HEAD_DIM = 64  # DeiT / DeiT-3 heads are 64 wide; the head count is not stored in a checkpoint


@dataclass(frozen=True)
class ViTSpec:
    """What a checkpoint says about one ViT anchor."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int
    in_chans: int
    num_classes: int
    mlp_ratio: float
    qkv_bias: bool
    no_embed_class: bool  # DeiT-3: pos_embed covers patches only, class token prepended after
    layer_scale: bool

    @property
    def name(self) -> str:
        return f"vit_d{self.embed_dim}_l{self.depth}_p{self.patch_size}_{self.img_size}" + ("_ls" if self.layer_scale else "")


def _rename_layer_scale(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SN-Netv2 stores LayerScale as ``blocks.i.gamma_1/2``; timm calls it ``ls1/ls2.gamma``."""
    return {re.sub(r"\.gamma_([12])$", r".ls\1.gamma", k): v for k, v in state.items()}


def detect_vit(state: dict[str, torch.Tensor], where: str) -> ViTSpec:
    """Describe the anchor whose (prefix-stripped) tensors are ``state``."""
    need = ("patch_embed.proj.weight", "pos_embed", "blocks.0.norm1.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise StitchError(f"{where}: not a ViT anchor: missing {', '.join(where + '.' + k for k in missing)}")
    proj = state["patch_embed.proj.weight"]
    embed_dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    tokens = state["pos_embed"].shape[1]
    if math.isqrt(tokens) ** 2 == tokens:
        no_embed_class, patches = True, tokens
    elif math.isqrt(tokens - 1) ** 2 == tokens - 1:
        no_embed_class, patches = False, tokens - 1
    else:
        raise StitchError(f"{where}.pos_embed: {tokens} positions is neither a square grid nor a grid plus a class token")
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    return ViTSpec(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=max(1, embed_dim // HEAD_DIM),
        patch_size=patch,
        img_size=math.isqrt(patches) * patch,
        in_chans=in_chans,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
        mlp_ratio=hidden / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        no_embed_class=no_embed_class,
        layer_scale=any(k.endswith(("gamma_1", "ls1.gamma")) for k in state),
    )


def build_vit(spec: ViTSpec) -> VisionTransformer:
    return VisionTransformer(
        img_size=spec.img_size, patch_size=spec.patch_size, in_chans=spec.in_chans,
        num_classes=spec.num_classes, embed_dim=spec.embed_dim, depth=spec.depth,
        num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio, qkv_bias=spec.qkv_bias,
        no_embed_class=spec.no_embed_class, init_values=1e-4 if spec.layer_scale else None,
        global_pool="token",
    )


def build_named(spec_text: str) -> nn.Module:
    """Build an ``--anchors`` entry: ``timm_name`` or ``timm_name:key=value:key=value``."""
    name, *items = spec_text.strip().split(":")
    kwargs = {}
    for item in filter(None, items):
        key, eq, value = item.partition("=")
        if not eq:
            raise StitchError(f"--anchors {spec_text!r}: expected key=value after ':', got {item!r}")
        kwargs[key.strip()] = _parse_value(value.strip())
    if not timm.is_model(name):
        raise StitchError(f"--anchors: unknown timm model {name!r}; see timm.list_models()")
    loading = sorted(k for k in kwargs if k.startswith(("pretrained", "checkpoint", "cache")))
    if loading:  # timm would read or download weights; the checkpoint's are the ones to use
        raise StitchError(f"--anchors {spec_text!r}: {loading[0]} is not allowed; the anchor's weights come from the checkpoint")
    try:
        with warnings.catch_warnings():  # timm/torch warn about odd sizes on stderr; the error says it once
            warnings.simplefilter("ignore")
            return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, KeyError, AssertionError, ZeroDivisionError, RuntimeError) as exc:  # timm rejects the kwargs
        raise StitchError(f"--anchors {spec_text!r}: {type(exc).__name__}: {first_line(exc)}") from None


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def load_into(module: nn.Module, state: dict[str, torch.Tensor], where: str,
              public_name: Callable[[str], str] = str) -> None:
    """Load ``state`` strictly, with one clear line for the first missing/unexpected/mismatched tensor.

    ``state`` is keyed by the names the public code saved; ``public_name`` maps each of ``module``'s
    keys to that name (identity for ViTs), so every message names the tensor as the checkpoint does.
    Buffers timm recomputes (not in its state dict) but the public code saved must equal timm's.
    """
    own = module.state_dict()
    names = {public_name(k): k for k in own}
    recomputed = {public_name(n): b for n, b in module.named_buffers() if n not in own}
    missing = [p for p in names if p not in state]
    unexpected = [p for p in state if p not in names and p not in recomputed]
    if missing:
        raise StitchError(f"{where}: missing tensor {where}.{missing[0]} ({len(missing)} missing); wrong anchors or a truncated checkpoint")
    if unexpected:
        raise StitchError(f"{where}: unexpected tensor {where}.{unexpected[0]} ({len(unexpected)} unexpected); the anchors do not match this checkpoint")
    for p, k in names.items():
        if tuple(state[p].shape) != tuple(own[k].shape):
            raise StitchError(f"{where}.{p}: shape mismatch: checkpoint {list(state[p].shape)} vs anchor {list(own[k].shape)}")
        if state[p].is_floating_point() != own[k].is_floating_point():  # load_state_dict would cast
            raise StitchError(f"{where}.{p}: dtype mismatch: checkpoint {state[p].dtype} vs anchor {own[k].dtype}")
    for p, buf in recomputed.items():
        if p in state and (state[p].shape != buf.shape or not torch.equal(state[p].to(buf.dtype), buf)):
            raise StitchError(f"{where}.{p}: differs from the value the anchor computes (checkpoint {list(state[p].shape)} "
                              f"vs anchor {list(buf.shape)}); the anchor's window, resolution or layout does not match the checkpoint")
    module.load_state_dict({k: state[p] for p, k in names.items()}, strict=True)


def vit_anchor(state: dict[str, torch.Tensor], where: str, named: str | None = None) -> tuple[nn.Module, str]:
    """Build and load one anchor from its tensors; ``named`` is an ``--anchors`` override."""
    state = _rename_layer_scale(state)
    if named:
        model = build_named(named)
        label = named
    else:
        spec = detect_vit(state, where)
        model, label = build_vit(spec), spec.name
    if not isinstance(model, VisionTransformer):
        raise StitchError(f"--anchors {named!r}: not a ViT (timm VisionTransformer); this family stitches ViTs")
    load_into(model, state, where)
    return model.eval(), label


class ViTStem(nn.Module):
    """Patch embedding, class token and position embedding: image -> tokens."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        v = self.vit
        return v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))


class ViTHead(nn.Module):
    """Class-token pool and classifier, with or without the final norm (SN-Net v1 skips it)."""

    def __init__(self, vit: VisionTransformer, final_norm: bool):
        super().__init__()
        self.vit, self.final_norm = vit, final_norm

    def forward(self, x):
        return self.vit.forward_head(self.vit.norm(x) if self.final_norm else x)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tokens(vit: VisionTransformer) -> int:
    return vit.patch_embed.num_patches + vit.num_prefix_tokens


def vit_segments(a: int, vit: VisionTransformer) -> dict[str, Segment]:
    """Stem, blocks and both head variants of anchor ``a``, with fvcore-convention FLOPs."""
    n, d = tokens(vit), vit.embed_dim
    in_chans = vit.patch_embed.proj.in_channels
    img = tuple(vit.patch_embed.img_size)
    kh, kw = vit.patch_embed.proj.kernel_size
    stem_flops = vit.patch_embed.num_patches * in_chans * kh * kw * d
    classes = vit.num_classes
    head_flops = d * classes
    head_params = _count(vit.norm) + _count(vit.head)
    segs = {
        f"stem:{a}": Segment(f"stem:{a}", ViTStem(vit), (in_chans, *img), stem_flops, _count(vit.patch_embed)),
        f"head:{a}": Segment(f"head:{a}", ViTHead(vit, True), (n, d), 5 * n * d + head_flops, head_params),
        f"head-skipnorm:{a}": Segment(f"head-skipnorm:{a}", ViTHead(vit, False), (n, d), head_flops, head_params),
    }
    for i, blk in enumerate(vit.blocks):
        hidden = blk.mlp.fc1.out_features
        flops = 10 * n * d + 4 * n * d * d + 2 * n * d * hidden + 2 * n * n * d
        segs[f"block:{a}:{i}"] = Segment(f"block:{a}:{i}", blk, (n, d), flops, _count(blk))
    return segs


def token_params(vit: VisionTransformer) -> int:
    """cls/pos tokens: counted for whole anchors, not for stitched configs (published tables)."""
    return _count(vit) - _count(vit.patch_embed) - _count(vit.blocks) - _count(vit.norm) - _count(vit.head)


def stitch_segment(key: str, layer: nn.Module, n_tokens: int) -> Segment:
    """A Linear stitching layer (wrapped in ``.transform``) applied to every token."""
    return token_stitch_segment(key, layer, (n_tokens, layer.transform.in_features))


def spec_dict(vit: VisionTransformer) -> dict:
    """The anchor description a manifest records."""
    return {
        "embed_dim": vit.embed_dim, "depth": len(vit.blocks), "tokens": tokens(vit),
        "num_classes": vit.num_classes, "img_size": list(vit.patch_embed.img_size),
    }

