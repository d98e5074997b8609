"""Test-side, independent stand-ins for the public SN-Net training code.

Writers produce checkpoints in the exact container and key layout the public code saves (dict
with ``model``, optimizer state and an ``args`` Namespace); the reference forward is plain tensor
math over the state dict, written from the public code's semantics without timm or stitch_compile.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

EPS = 1e-6


def _vit_state(gen: torch.Generator, dim: int, depth: int, img: int, patch: int, classes: int,
               deit3: bool) -> dict[str, torch.Tensor]:
    """A random ViT state dict in timm key layout (DeiT) or the SN-Netv2 DeiT-3 layout."""
    def rnd(*shape, scale=0.05):
        return torch.randn(*shape, generator=gen) * scale

    grid = (img // patch) ** 2
    s = {
        "cls_token": rnd(1, 1, dim, scale=0.5),
        "pos_embed": rnd(1, grid if deit3 else grid + 1, dim, scale=0.5),
        "patch_embed.proj.weight": rnd(dim, 3, patch, patch, scale=0.1),
        "patch_embed.proj.bias": rnd(dim),
        "norm.weight": 1 + rnd(dim), "norm.bias": rnd(dim),
        "head.weight": rnd(classes, dim, scale=0.2), "head.bias": rnd(classes),
    }
    hidden = 4 * dim
    for i in range(depth):
        b = f"blocks.{i}."
        s.update({
            b + "norm1.weight": 1 + rnd(dim), b + "norm1.bias": rnd(dim),
            b + "attn.qkv.weight": rnd(3 * dim, dim, scale=dim ** -0.5), b + "attn.qkv.bias": rnd(3 * dim),
            b + "attn.proj.weight": rnd(dim, dim, scale=dim ** -0.5), b + "attn.proj.bias": rnd(dim),
            b + "norm2.weight": 1 + rnd(dim), b + "norm2.bias": rnd(dim),
            b + "mlp.fc1.weight": rnd(hidden, dim, scale=dim ** -0.5), b + "mlp.fc1.bias": rnd(hidden),
            b + "mlp.fc2.weight": rnd(dim, hidden, scale=hidden ** -0.5), b + "mlp.fc2.bias": rnd(dim),
        })
        if deit3:
            s[b + "gamma_1"] = 0.5 + rnd(dim)
            s[b + "gamma_2"] = 0.5 + rnd(dim)
    return s


def _save(path, model_state: dict, **args) -> None:
    """The public training code's container: model, optimizer, scheduler, epoch, scaler, args."""
    torch.save({
        "model": model_state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "lr_scheduler": {"last_epoch": 3},
        "epoch": 3,
        "scaler": {"scale": 65536.0},
        "args": argparse.Namespace(model="snnet", epochs=50, **args),
    }, path)


def v1_state(widths=(64, 128, 192), depth=12, img=32, patch=8, classes=10, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for a, dim in enumerate(widths):
        state.update({f"anchors.{a}.{k}": v for k, v in _vit_state(gen, dim, depth, img, patch, classes, False).items()})
    n_layers = depth - 1  # window 2, stride 1
    for p in range(len(widths) - 1):
        ca, cb = widths[p], widths[p + 1]
        for l in range(n_layers):
            state[f"stitch_layers.{p}.{l}.transform.weight"] = torch.randn(cb, ca, generator=gen) * ca ** -0.5
            state[f"stitch_layers.{p}.{l}.transform.bias"] = torch.randn(cb, generator=gen) * 0.05
    return state


def write_v1(path, **kw) -> dict[str, torch.Tensor]:
    state = v1_state(**kw)
    _save(path, state, stitch_kernel=2)
    return state


def v2_state(widths=(64, 128), depths=(12, 24), img=32, patch=8, classes=10, rank=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for a, (dim, depth) in enumerate(zip(widths, depths)):
        state.update({f"anchors.{a}.{k}": v for k, v in _vit_state(gen, dim, depth, img, patch, classes, True).items()})
    d0, d1 = depths
    counts = (d0, d1 - 1 if d0 == d1 else len(range(1, d1 - 1, 2)))
    for front, count in enumerate(counts):
        cin, cout = widths[front], widths[1 - front]
        for l in range(count):
            k = f"stitch_layers.{front}.{l}.transform."
            state[k + "weight"] = torch.randn(cout, cin, generator=gen) * cin ** -0.5
            state[k + "bias"] = torch.randn(cout, generator=gen) * 0.05
            state[k + "lora_A"] = torch.randn(rank, cin, generator=gen) * 0.1
            state[k + "lora_B"] = torch.randn(cout, rank, generator=gen) * 0.1
    return state


def write_v2(path, **kw) -> dict[str, torch.Tensor]:
    state = v2_state(**kw)
    _save(path, state, lora_r=kw.get("rank", 8))
    return state


# ---- reference forward: plain tensor math over the state dict --------------------------------

def _ln(x, s, p):
    return F.layer_norm(x, x.shape[-1:], s[p + ".weight"], s[p + ".bias"], EPS)


def _lin(x, s, p):
    return x @ s[p + ".weight"].T + s[p + ".bias"]


def _block(x, s, p, heads):
    B, N, C = x.shape
    h = _ln(x, s, p + "norm1")
    qkv = _lin(h, s, p + "attn.qkv").reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    a = _lin((attn @ v).transpose(1, 2).reshape(B, N, C), s, p + "attn.proj")
    x = x + (s[p + "gamma_1"] * a if p + "gamma_1" in s else a)
    m = _lin(F.gelu(_lin(_ln(x, s, p + "norm2"), s, p + "mlp.fc1")), s, p + "mlp.fc2")
    return x + (s[p + "gamma_2"] * m if p + "gamma_2" in s else m)


def _stem(img, s, a):
    p = f"anchors.{a}."
    w = s[p + "patch_embed.proj.weight"]
    x = F.conv2d(img, w, s[p + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    cls = s[p + "cls_token"].expand(x.shape[0], -1, -1)
    pos = s[p + "pos_embed"]
    if pos.shape[1] == x.shape[1]:  # DeiT-3: add, then prepend the class token
        return torch.cat([cls, x + pos], 1)
    return torch.cat([cls, x], 1) + pos


def _depth(s, a):
    return len({k.split(".")[3] for k in s if k.startswith(f"anchors.{a}.blocks.")})


def _heads(s, a):
    return s[f"anchors.{a}.cls_token"].shape[-1] // 64


def _blocks(x, s, a, ids):
    for i in ids:
        x = _block(x, s, f"anchors.{a}.blocks.{i}.", _heads(s, a))
    return x


def _head(x, s, a, norm):
    if norm:
        x = _ln(x, s, f"anchors.{a}.norm")
    return _lin(x[:, 0], s, f"anchors.{a}.head")


def v1_forward(s, img, comb, cfgs, layers):
    """The public SN-Net v1 forward (anchors with final norm; stitched heads without it)."""
    if len(comb) == 1:
        a = comb[0]
        return _head(_blocks(_stem(img, s, a), s, a, range(_depth(s, a))), s, a, True)
    (a, b), ((j, k),), (l,) = comb, cfgs, layers
    x = _blocks(_stem(img, s, a), s, a, range(j + 1))
    x = _lin(x, s, f"stitch_layers.{a}.{l}.transform")
    return _head(_blocks(x, s, b, range(k, _depth(s, b))), s, b, False)


def v2_forward(s, img, comb, ranges, layer_ids, alpha=1.0):
    """The public SN-Netv2 forward, applying LoRA unmerged as the training code does."""
    if len(comb) == 1:
        a = comb[0]
        return _head(_blocks(_stem(img, s, a), s, a, range(_depth(s, a))), s, a, True)
    x = _stem(img, s, comb[0])
    for a, (begin, end), l in zip(comb, ranges, layer_ids):
        x = _blocks(x, s, a, [i for i in range(_depth(s, a)) if begin <= i <= end])
        if l != -1:
            p = f"stitch_layers.{a}.{l}.transform."
            r = s[p + "lora_A"].shape[0]
            x = x @ s[p + "weight"].T + s[p + "bias"] + (x @ s[p + "lora_A"].T @ s[p + "lora_B"].T) * (alpha / r)
    return _head(x, s, comb[-1], True)


def vit_flops(dim: int, depth: int, tokens: int, patches: int, patch: int, classes: int) -> int:
    """fvcore convention, counted term by term from the layer shapes."""
    n, d = tokens, dim
    per_block = 2 * 5 * n * d + n * d * 3 * d + 2 * n * n * d + n * d * d + n * d * 4 * d + n * 4 * d * d
    return patches * 3 * patch * patch * d + depth * per_block + 5 * n * d + d * classes


assert math.isclose(vit_flops(192, 12, 197, 196, 16, 1000), 1_258_411_200)
