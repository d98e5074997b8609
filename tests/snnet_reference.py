"""Test-side, independent stand-ins for the public SN-Net training code.

Writers produce checkpoints in the exact container and key layout the public code saves (dict
with ``model``, optimizer state and an ``args`` Namespace); the reference forward is plain tensor
math over the state dict, written from the public code's semantics without timm or stitch_compile.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import torch
import torch.nn.functional as F

EPS = 1e-6
REFERENCE_DIR = Path(__file__).parent / "reference"  # the public code's enumerations, copied from shared/reference
# The shapes of the session fixtures (conftest.py): small, but every structural feature is there.
V1_SHAPE = dict(widths=(64, 128, 192), depth=12, img=32, patch=8, classes=10)
V2_SHAPE = dict(widths=(64, 128), depths=(12, 24), img=32, patch=8, classes=10)
# ``--anchors`` entries naming real timm models, with kwargs that give the fixtures' anchors.
_SMALL = "img_size=32:patch_size=8:num_classes=10"
V1_NAMED = [f"deit_tiny_patch16_224:embed_dim=64:num_heads=1:{_SMALL}",
            f"deit_tiny_patch16_224:embed_dim=128:num_heads=2:{_SMALL}",
            f"deit_tiny_patch16_224:{_SMALL}"]
V2_NAMED = [f"deit3_small_patch16_224:embed_dim=64:num_heads=1:{_SMALL}",
            f"deit3_small_patch16_224:embed_dim=128:num_heads=2:depth=24:{_SMALL}"]


def v1_reference() -> tuple[list[tuple], int]:
    """([(comb_id, stitch_cfgs, stitch_layers)] by config id, stitching layers per pair) of DeiT Ti/S/B."""
    ref = json.loads((REFERENCE_DIR / "snnet_v1_deit_ti_s_b.configs.json").read_text())
    configs = ref["configs"]
    assert sorted(map(int, configs)) == list(range(ref["num_configs"]))
    table = [(tuple(c["comb_id"]), tuple(map(tuple, c["stitch_cfgs"])), tuple(c["stitch_layers"]))
             for c in (configs[str(i)] for i in range(len(configs)))]
    return table, ast.literal_eval(ref["stitch_layer_info"])["num_stitches_per_pair"]


def v2_reference(depths: tuple[int, int]) -> list[dict]:
    """Every SN-Netv2 config dict (comb_id, stitch_cfgs, stitch_layer_ids, route) by id."""
    ref = json.loads((REFERENCE_DIR / f"snnetv2_depth{depths[0]}_{depths[1]}.configs.json").read_text())
    assert sorted(map(int, ref)) == list(range(len(ref)))
    return [ref[str(i)] for i in range(len(ref))]


def v2_fields(entry: dict) -> tuple[list, list, list]:
    """(comb_id, route ranges, stitch_layer_ids) of one v2 reference entry; anchors have no ranges."""
    return entry["comb_id"], entry.get("route", []), entry.get("stitch_layer_ids", [])


def images(batch=2, img=32, seed=1) -> torch.Tensor:
    return torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(seed))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


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


def save_public(path, model_state: dict, **args) -> None:
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
    """Anchors of ``widths`` (any number: Learngene pools have 4+); equal-width neighbours stitch by
    identity and have no stitching-layer tensors, as in Learngene Pool."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for a, dim in enumerate(widths):
        state.update({f"anchors.{a}.{k}": v for k, v in _vit_state(gen, dim, depth, img, patch, classes, False).items()})
    n_layers = depth - 1  # window 2, stride 1
    for p in range(len(widths) - 1):
        ca, cb = widths[p], widths[p + 1]
        if ca == cb:
            continue
        for l in range(n_layers):
            state[f"stitch_layers.{p}.{l}.transform.weight"] = torch.randn(cb, ca, generator=gen) * ca ** -0.5
            state[f"stitch_layers.{p}.{l}.transform.bias"] = torch.randn(cb, generator=gen) * 0.05
    return state


def write_v1(path, **kw) -> dict[str, torch.Tensor]:
    state = v1_state(**kw)
    save_public(path, state, stitch_kernel=2)
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
    save_public(path, state, lora_r=kw.get("rank", 8))
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


def _stitch(x, s, p, alpha):
    """Linear stitching layer at prefix ``p``; LoRA applied unmerged; absent tensors = identity."""
    if p + "weight" not in s:
        return x
    y = x @ s[p + "weight"].T + s[p + "bias"]
    if p + "lora_A" in s:
        y = y + (x @ s[p + "lora_A"].T @ s[p + "lora_B"].T) * (alpha / s[p + "lora_A"].shape[0])
    return y


def v1_plan(s, comb, cfgs, layers):
    """[(anchor, block ids, stitching-layer prefix or None)] run by a v1 config, in order."""
    if len(comb) == 1:
        return [(comb[0], range(_depth(s, comb[0])), None)]
    (a, b), ((j, k),), (l,) = comb, cfgs, layers
    return [(a, range(j + 1), f"stitch_layers.{a}.{l}.transform."), (b, range(k, _depth(s, b)), None)]


def v2_plan(s, comb, ranges, layer_ids):
    """The same for SN-Netv2: per anchor, its [begin, end] range clipped to depth; -1 = no layer."""
    if len(comb) == 1:
        return [(comb[0], range(_depth(s, comb[0])), None)]
    return [(a, [i for i in range(_depth(s, a)) if begin <= i <= end],
             None if l == -1 else f"stitch_layers.{a}.{l}.transform.")
            for a, (begin, end), l in zip(comb, ranges, layer_ids)]


def _run(s, img, plan, head_norm, alpha=1.0):
    x = _stem(img, s, plan[0][0])
    for a, ids, stitch in plan:
        x = _blocks(x, s, a, ids)
        if stitch:
            x = _stitch(x, s, stitch, alpha)
    return _head(x, s, plan[-1][0], head_norm)


def v1_forward(s, img, comb, cfgs, layers, stitched_norm=False):
    """The public SN-Net v1 forward: anchors with the final norm, stitched heads without it
    (``stitched_norm=True`` is the wrong variant, for showing the difference matters)."""
    return _run(s, img, v1_plan(s, comb, cfgs, layers), len(comb) == 1 or stitched_norm)


def v2_forward(s, img, comb, ranges, layer_ids, alpha=1.0):
    """The public SN-Netv2 forward, applying LoRA unmerged as the training code does."""
    return _run(s, img, v2_plan(s, comb, ranges, layer_ids), True, alpha)


# ---- published cost conventions, term by term (SNNET_FORMATS.md) -------------------------------

def stem_flops(patches: int, patch: int, dim: int, in_chans: int = 3) -> int:
    return patches * in_chans * patch * patch * dim


def block_flops(n: int, d: int, hidden: int) -> int:
    """Two LayerNorms, qkv, q.k^T, attn.v, proj, fc1, fc2."""
    return 2 * 5 * n * d + n * d * 3 * d + n * n * d + n * n * d + n * d * d + n * d * hidden + n * hidden * d


def head_flops(n: int, d: int, classes: int, norm: bool) -> int:
    return (5 * n * d if norm else 0) + d * classes


def vit_flops(dim: int, depth: int, tokens: int, patches: int, patch: int, classes: int) -> int:
    """A whole ViT anchor (mlp ratio 4)."""
    return stem_flops(patches, patch, dim) + depth * block_flops(tokens, dim, 4 * dim) + head_flops(tokens, dim, classes, True)


def _numel(s, prefix):
    return sum(v.numel() for k, v in s.items() if k.startswith(prefix))


def plan_cost(s, plan, head_norm: bool, img: int) -> tuple[int, int]:
    """(FLOPs, params) of a config's plan, from the state dict's shapes and the image size.

    Params: a whole anchor counts every tensor it holds; a stitched config counts the first
    anchor's patch embedding, the blocks run, each stitching layer's dense weight and bias (LoRA
    factors fold into the weight) and the last anchor's norm and head.
    """
    def dim(a):
        return s[f"anchors.{a}.cls_token"].shape[-1]

    first, last = plan[0][0], plan[-1][0]
    patch = s[f"anchors.{first}.patch_embed.proj.weight"].shape[-1]
    patches = (img // patch) ** 2
    n = patches + 1  # the class token
    flops = stem_flops(patches, patch, dim(first))
    params = _numel(s, f"anchors.{first}.patch_embed.")
    for a, ids, stitch in plan:
        hidden = s[f"anchors.{a}.blocks.0.mlp.fc1.weight"].shape[0]
        flops += len(ids) * block_flops(n, dim(a), hidden)
        params += sum(_numel(s, f"anchors.{a}.blocks.{i}.") for i in ids)
        if stitch and stitch + "weight" in s:
            flops += n * s[stitch + "weight"].numel()
            params += s[stitch + "weight"].numel() + s[stitch + "bias"].numel()
    flops += head_flops(n, dim(last), s[f"anchors.{last}.head.weight"].shape[0], head_norm)
    if len(plan) == 1:
        return flops, _numel(s, f"anchors.{first}.")
    return flops, params + _numel(s, f"anchors.{last}.norm.") + _numel(s, f"anchors.{last}.head.")


def v1_cost(s, comb, cfgs, layers, img: int) -> tuple[int, int]:
    """(FLOPs, params) of a v1 config: whole anchors end with the norm, stitched configs without."""
    return plan_cost(s, v1_plan(s, comb, cfgs, layers), len(comb) == 1, img)


assert vit_flops(192, 12, 197, 196, 16, 1000) == 1_258_411_200  # DeiT-Ti, published
