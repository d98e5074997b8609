"""Least-squares initialisation of stitching layers, and ``stitch()``: ViT anchors -> SN-Net v1.

SN-Net starts each stitching layer at the affine map that best carries anchor A's activations to
anchor B's on a calibration batch (the paper's "LS init"): a few epochs of stitched training then
suffice. For a stitching position (j, k): X = output of A's block j, Y = output of B's block k-1
(B's stem output for k = 0), both flattened to (tokens, C); solve ``[X 1] A = Y`` by
pseudo-inverse; weight = A^T without its last column, bias = that column. Positions that share
one stitching layer average their solutions. We solve in float64 with the truncation (rtol) of the
public code's float32 ``pinv``, so near-singular directions are dropped as it drops them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Sequence

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import StitchError
from ..images import IMAGE_SUFFIXES, find_images, load_image
from .checkpoint import read_state_dict
from .families import snnet_v1
from .families.vit_anchor import ViTStem, tokens, vit_anchor
from .network import StitchableNet

# Calibration images are normalised like ImageNet-trained timm ViTs expect (DeiT's statistics).
PARITY_IMAGES = 8  # images used to check the rebuilt anchors against the given ones
NAMES_HINT = "pass the anchors' timm names (names=..., CLI --anchors)"


def _design_pinv(x: torch.Tensor) -> torch.Tensor:
    """pinv([X 1]) in float64 for X flattened to (tokens, C); the ones column carries the bias."""
    x = x.reshape(-1, x.shape[-1]).double()
    design = torch.cat([x, x.new_ones(len(x), 1)], dim=1)
    rtol = max(design.shape) * torch.finfo(torch.float32).eps  # the public float32 pinv's cut-off
    return torch.linalg.pinv(design, rtol=rtol)


def _split(solution: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (C_in + 1, C_out) -> (weight [C_out, C_in], bias [C_out])."""
    return solution[:-1].T.contiguous(), solution[-1].contiguous()


def solve_affine(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares (weight, bias) with ``y ~ x @ weight.T + bias`` over all tokens (float64)."""
    return _split(_design_pinv(x) @ y.reshape(-1, y.shape[-1]).double())


@contextmanager
def _eval_mode(modules: Sequence[nn.Module]):
    """Run the caller's anchors deterministically, then give them back in their own mode."""
    modes = [m.training for m in modules]
    try:
        yield [m.eval() for m in modules]
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


@torch.no_grad()
def block_inputs(vit: VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """[stem output, block 0 output, ..., last block output]: entry k is what block k reads."""
    x = ViTStem(vit)(images)
    outs = [x]
    for block in vit.blocks:
        x = block(x)
        outs.append(x)
    return outs


def ls_stitching_layers(features: Sequence[Sequence[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``stitch_layers.{p}.{l}.transform.*`` for each neighbouring pair (p, p+1) of anchors.

    ``features[a]`` is :func:`block_inputs` of anchor ``a`` (computed once per anchor). Positions
    come from the v1 enumeration; pinv([X 1]) depends only on j, so it is computed once per j.
    """
    depth = len(features[0]) - 1
    positions, layer_of, n_layers = snnet_v1.stitch_positions(depth)
    state = {}
    for p in range(len(features) - 1):
        solutions: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        for j in sorted({j for j, _ in positions}):
            pinv = _design_pinv(features[p][j + 1])
            for (front, k), layer in zip(positions, layer_of):
                if front == j:
                    y = features[p + 1][k]
                    solutions[layer].append(pinv @ y.reshape(-1, y.shape[-1]).double())
        for layer, found in enumerate(solutions):
            weight, bias = _split(torch.stack(found).mean(0))
            state[f"stitch_layers.{p}.{layer}.transform.weight"] = weight.float()
            state[f"stitch_layers.{p}.{layer}.transform.bias"] = bias.float()
    return state


def _check_anchors(anchors: Sequence[nn.Module], images: torch.Tensor) -> None:
    if len(anchors) < 2:
        raise StitchError(f"stitching needs at least 2 anchors, got {len(anchors)}")
    for i, vit in enumerate(anchors):
        if not isinstance(vit, VisionTransformer):
            raise StitchError(f"anchor {i}: {type(vit).__name__} is not a timm VisionTransformer; "
                              "SN-Net v1 stitching takes ViT anchors")
    widths = [v.embed_dim for v in anchors]
    depths = [len(v.blocks) for v in anchors]
    grids = [tokens(v) for v in anchors]
    if len(set(depths)) != 1:
        raise StitchError(f"anchors must have equal depth, found {depths} blocks")
    if len(set(grids)) != 1:
        raise StitchError(f"anchors must have equal token grids, found {grids} tokens")
    if widths != sorted(widths):
        raise StitchError(f"anchors must be ordered by increasing width (smallest first), found widths {widths}")
    classes = sorted({v.num_classes for v in anchors})
    if len(classes) != 1 or classes[0] < 1:
        raise StitchError(f"anchors' classifier heads have {classes} classes (0: no head); an SN-Net's anchors "
                          "share one head size")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.dtype != torch.float32 or not len(images):
        raise StitchError(f"calibration images must be a non-empty float32 tensor [N, C, H, W], got "
                          f"{getattr(images, 'dtype', type(images).__name__)} {list(getattr(images, 'shape', []))}")
    if not torch.isfinite(images).all():
        raise StitchError("calibration images hold NaN or Inf")
    for i, vit in enumerate(anchors):
        want = (vit.patch_embed.proj.in_channels, *vit.patch_embed.img_size)
        if tuple(images.shape[1:]) != want:
            raise StitchError(f"anchor {i} takes images {list(want)}, calibration images are {list(images.shape[1:])}")


def _check_rebuilt(net: StitchableNet, anchors: Sequence[nn.Module], images: torch.Tensor) -> None:
    """The saved layout must reproduce the given anchors (pooling, norms, heads = width / 64)."""
    x = images[:PARITY_IMAGES]
    with torch.no_grad():
        for a, vit in enumerate(anchors):
            if not torch.allclose(net(x, a), vit(x), rtol=1e-4, atol=1e-5):
                raise StitchError(f"anchor {a}: the SN-Net v1 layout rebuilds a different network (pooling, norms "
                                  f"or head count differ from DeiT's); {NAMES_HINT}")


def stitch(anchors: Sequence[nn.Module], calib_images: torch.Tensor,
           names: Sequence[str] | None = None) -> StitchableNet:
    """Stitch timm ViT anchors (equal depth and token grid, smallest first) into an SN-Net v1.

    Stitching layers are LS-initialised on ``calib_images`` (float [N, 3, H, W], normalised as the
    anchors were trained). The network is built by the v1 family from the very state dict
    :func:`~stitch_compile.model.checkpoint.save_checkpoint` writes, so loading that file gives the
    same network. ``names`` are timm names (``name:key=value``) for anchors that are not DeiT-like.
    """
    _check_anchors(anchors, calib_images)
    with _eval_mode(anchors) as vits:
        features = [block_inputs(v, calib_images) for v in vits]
        state = {f"anchors.{a}.{k}": v for a, vit in enumerate(vits) for k, v in vit.state_dict().items()}
        state.update(ls_stitching_layers(features))
        del features  # ~0.9 GB for DeiT-Ti/S/B on 64 images: free before build copies
        try:
            net = snnet_v1.build(state, list(names) if names else None)
        except StitchError as exc:
            if names:
                raise
            raise StitchError(f"{exc}: the anchors are not DeiT-like; {NAMES_HINT}") from None
        _check_rebuilt(net, vits, calib_images)
    return net


def read_anchor(path: str, name: str | None = None) -> nn.Module:
    """A timm ViT from a checkpoint file (bare state dict or under 'model' / 'state_dict').

    ``name`` (``timm_name[:key=value...]``) picks the architecture; without it, it is read from
    the tensors as for SN-Net checkpoints.
    """
    state, _ = read_state_dict(path)
    return vit_anchor(state, path, name)[0]


def read_calibration_images(folder: str, size: tuple[int, int], count: int = 64, seed: int = 0) -> torch.Tensor:
    """Up to ``count`` images from ``folder`` (sub-folders included) as a normalised [N, 3, H, W] batch.

    A fixed-seed sample spreads the batch over class sub-folders; preprocessing is
    :func:`stitch_compile.images.load_image`'s (resize to cover, centre crop, ImageNet mean/std).
    """
    if not os.path.isdir(folder):
        raise StitchError(f"{folder}: not a folder; --calib takes a folder of images (class sub-folders allowed)")
    paths = find_images(folder)
    if not paths:
        raise StitchError(f"{folder}: no images found ({', '.join(IMAGE_SUFFIXES)}, sub-folders included)")
    if len(paths) > count:
        pick = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))[:count]
        paths = [paths[i] for i in sorted(pick.tolist())]
    return torch.from_numpy(np.stack([load_image(p, size) for p in paths]))
