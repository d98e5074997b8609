"""Test-side stand-ins for the public SN-Net v1 Swin, ResNet, ResNet/Swin and LeViT code.

Nothing here imports stitch_compile. Writers take timm anchors with random weights, rename their
tensors to the layout the public code saves (Microsoft Swin / timm 0.6 Swin, timm ResNet, Facebook
LeViT), add the buffers the public code saves, computed the public code's way, and wrap them in the
public containers. The reference forward runs those same timm submodules in the public code's order
(``forward_until`` / stitching layer / ``forward_from``); FLOPs are counted from the architecture.
"""

from __future__ import annotations

import argparse
import itertools
import math
import re

import torch
import torch.nn.functional as F
from timm.models.levit import LevitDistilled
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.swin_transformer import SwinTransformer
from torch import nn

CLASSES = 10

# ---- tiny anchors (random, every norm and bias perturbed so that no branch is an identity) ----------

SWIN_TSB = dict(img=32, patch=2, window=2, anchors=[(8, (2, 2, 2, 2), (1, 2, 2, 4)),
                                                     (8, (2, 2, 6, 2), (1, 2, 2, 4)),
                                                     (12, (2, 2, 6, 2), (1, 2, 3, 4))])
RESNET_PAIR = [(False, (2, 2, 2, 2)), (True, (3, 4, 6, 3))]  # ResNet-18 / ResNet-50 block types and depths
RESNET_CHANNELS = (8, 16, 32, 64)
RESNET_SWIN = dict(img=64, patch=4, window=2, swin=(8, (2, 2, 6, 2), (1, 2, 2, 4)))
LEVIT_PAIR = dict(img=128, key_dim=4, anchors=[((16, 24, 32), (2, 3, 4)), ((24, 32, 40), (3, 4, 5))])


def randomize(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen)
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            elif name.endswith("weight") and t.ndim == 1:
                t.copy_(1 + 0.2 * noise)
            elif name.endswith("weight"):
                t.copy_(noise * t[0].numel() ** -0.5)
            else:
                t.copy_(0.2 * noise)
    return model.eval()


def tiny_swin(embed, depths, heads, img, patch, window, seed=0) -> SwinTransformer:
    return randomize(SwinTransformer(img_size=img, patch_size=patch, embed_dim=embed, depths=depths, num_heads=heads,
                                     window_size=window, num_classes=CLASSES), seed)


def tiny_resnet(bottleneck, layers, seed=0) -> ResNet:
    return randomize(ResNet(Bottleneck if bottleneck else BasicBlock, layers, channels=RESNET_CHANNELS,
                            num_classes=CLASSES), seed)


def tiny_levit(embed, heads, img, key_dim, seed=0) -> LevitDistilled:
    return randomize(LevitDistilled(img_size=img, embed_dim=embed, key_dim=key_dim, depth=(4, 4, 4), num_heads=heads,
                                    num_classes=CLASSES), seed)


def empty(factory):
    """A real-size anchor without paying for its init: values are garbage, shapes and buffers right."""
    with torch.device("meta"):
        model = factory()
    model.to_empty(device="cpu")
    for m in model.modules():
        if hasattr(m, "init_non_persistent_buffers"):
            m.init_non_persistent_buffers()
    return model.eval()


# ---- the public enumeration, re-derived from the public code ------------------------------------

def public_configs(stage_depths, stages):
    """[{comb_id, stage_id, stitch_cfgs, stitch_layers}] and {(stage, pair): layer count}."""
    configs = [{"comb_id": [a], "stitch_cfgs": [], "stitch_layers": []} for a in range(len(stage_depths))]
    counts = {}
    for s in stages:
        depths = [d[s] for d in stage_depths]
        for p in range(len(depths) - 1):
            front, back = depths[p], depths[p + 1]
            if front == back:  # window of 2, stride 1, forward pairs only
                cfgs = [(i, i + 1) for i in range(front - 1)]
                layers, counts[(s, p)] = list(range(front - 1)), front - 1
            else:
                near = F.interpolate(torch.arange(front, dtype=torch.float)[None, None], back).squeeze().long().tolist()
                cfgs = [(idx, i) for idx in range(front) for i, e in enumerate(near) if e == idx and idx < i]
                layers, counts[(s, p)] = near, front  # zip() pairs them by list position
            configs += [{"comb_id": [p, p + 1], "stage_id": s, "stitch_cfgs": [list(c)], "stitch_layers": [l]}
                        for c, l in zip(cfgs, layers)]
    return configs, counts


def stitch_tensors(counts, stages, dims, conv, seed=0):
    """``stitch_layers.<index of stage>.<pair>.<layer>.transform.*`` with ``dims[a][stage]`` widths."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for (s, p), n in counts.items():
        cin, cout = dims[p][s], dims[p + 1][s]
        for l in range(n):
            w = torch.randn((cout, cin, 1, 1) if conv else (cout, cin), generator=gen) * cin ** -0.5
            out[f"stitch_layers.{stages.index(s)}.{p}.{l}.transform.weight"] = w
            out[f"stitch_layers.{stages.index(s)}.{p}.{l}.transform.bias"] = torch.randn(cout, generator=gen) * 0.1
    return out


# ---- public key layouts ---------------------------------------------------------------------------

def ms_relative_position_index(w):
    coords = torch.stack(torch.meshgrid([torch.arange(w), torch.arange(w)], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += w - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    return rel.sum(-1)


def ms_attn_mask(res, w, shift):
    img_mask = torch.zeros(1, res, res, 1)
    cnt = 0
    for h in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
        for v in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
            img_mask[:, h, v, :] = cnt
            cnt += 1
    windows = img_mask.view(1, res // w, w, res // w, w, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def swin_public(m: SwinTransformer, img, patch, window) -> dict[str, torch.Tensor]:
    """Microsoft Swin / timm 0.6 keys: merging at the end of stage i, ``head.*``, saved index and mask buffers."""
    out = {}
    for k, v in m.state_dict().items():
        d = re.match(r"layers\.(\d+)\.downsample\.(.+)", k)
        k = f"layers.{int(d.group(1)) - 1}.downsample.{d.group(2)}" if d else re.sub(r"^head\.fc\.", "head.", k)
        out[k] = v
    for i, stage in enumerate(m.layers):
        res = img // patch // 2 ** i
        w = window if res > window else res
        for j in range(len(stage.blocks)):
            out[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = ms_relative_position_index(w)
            if j % 2 and res > window:
                out[f"layers.{i}.blocks.{j}.attn_mask"] = ms_attn_mask(res, w, w // 2)
    return out


LEVIT_ATTN = {"qkv.linear.": "qkv.c.", "kv.linear.": "kv.c.", "q.ln.linear.": "q.1.c.", "q.ln.bn.": "q.1.bn.",
              "proj.ln.linear.": "proj.1.c.", "proj.ln.bn.": "proj.1.bn."}
LEVIT_MLP = {"ln1.linear.": "0.c.", "ln1.bn.": "0.bn.", "ln2.linear.": "2.c.", "ln2.bn.": "2.bn."}


def fb_attention_bias_idxs(res, stride=1):
    """The Facebook LeViT index: offsets numbered in order of first appearance."""
    points = list(itertools.product(range(res), range(res)))
    points_ = list(itertools.product(range(0, res, stride), range(0, res, stride)))
    offsets, idxs = {}, []
    for p1 in points_:
        for p2 in points:
            off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            idxs.append(offsets.setdefault(off, len(offsets)))
    return torch.LongTensor(idxs).view(len(points_), len(points))


def levit_public(m: LevitDistilled, img) -> dict[str, torch.Tensor]:
    """Facebook LeViT keys: ``patch_embed.<2i>.{c,bn}``, one flat ``blocks`` list, ``head{,_dist}.l``."""
    sd, out = m.state_dict(), {}

    def put(timm_prefix, fb_prefix, table):
        for k, v in sd.items():
            if k.startswith(timm_prefix):
                rest = k[len(timm_prefix):]
                for old, new in table.items():
                    if rest.startswith(old):
                        rest = new + rest[len(old):]
                        break
                out[fb_prefix + rest] = v

    for i in range(4):
        put(f"stem.conv{i + 1}.", f"patch_embed.{2 * i}.", {"linear.": "c."})
    n, res = 0, img // 16
    for s, stage in enumerate(m.stages):
        if s:
            put(f"stages.{s}.downsample.attn_downsample.", f"blocks.{n}.", LEVIT_ATTN)
            out[f"blocks.{n}.attention_bias_idxs"] = fb_attention_bias_idxs(res, 2)
            put(f"stages.{s}.downsample.mlp.", f"blocks.{n + 1}.m.", LEVIT_MLP)
            n, res = n + 2, (res - 1) // 2 + 1
        for i in range(len(stage.blocks)):
            put(f"stages.{s}.blocks.{i}.attn.", f"blocks.{n}.m.", LEVIT_ATTN)
            out[f"blocks.{n}.m.attention_bias_idxs"] = fb_attention_bias_idxs(res)
            put(f"stages.{s}.blocks.{i}.mlp.", f"blocks.{n + 1}.m.", LEVIT_MLP)
            n += 2
    put("head.", "head.", {"linear.": "l."})
    put("head_dist.", "head_dist.", {"linear.": "l."})
    return out


def prefixed(anchors: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"anchors.{a}.{k}": v for a, state in enumerate(anchors) for k, v in state.items()}


# ---- tiny checkpoints: (state, timm anchors, stitched stages) -------------------------------------

def swin_tsb(seed=0):
    c = SWIN_TSB
    anchors = [tiny_swin(e, d, h, c["img"], c["patch"], c["window"], seed + a) for a, (e, d, h) in enumerate(c["anchors"])]
    stages = (0, 1, 2)
    _, counts = public_configs([d for _, d, _ in c["anchors"]], stages)
    dims = [[e * 2 ** s for s in range(4)] for e, _, _ in c["anchors"]]
    state = prefixed([swin_public(m, c["img"], c["patch"], c["window"]) for m in anchors])
    return {**state, **stitch_tensors(counts, stages, dims, conv=False, seed=seed)}, anchors, stages


def resnet_pair(seed=0):
    anchors = [tiny_resnet(b, layers, seed + a) for a, (b, layers) in enumerate(RESNET_PAIR)]
    stages = (1, 2)
    _, counts = public_configs([layers for _, layers in RESNET_PAIR], stages)
    dims = [[c * (4 if b else 1) for c in RESNET_CHANNELS] for b, _ in RESNET_PAIR]
    state = prefixed([m.state_dict() for m in anchors])
    return {**state, **stitch_tensors(counts, stages, dims, conv=True, seed=seed)}, anchors, stages


def resnet_swin(seed=0):
    c = RESNET_SWIN
    e, d, h = c["swin"]
    anchors = [tiny_resnet(False, (2, 2, 2, 2), seed), tiny_swin(e, d, h, c["img"], c["patch"], c["window"], seed + 1)]
    stages = (1, 2)
    _, counts = public_configs([(2, 2, 2, 2), d], stages)
    dims = [list(RESNET_CHANNELS), [e * 2 ** s for s in range(4)]]
    state = prefixed([anchors[0].state_dict(), swin_public(anchors[1], c["img"], c["patch"], c["window"])])
    return {**state, **stitch_tensors(counts, stages, dims, conv=True, seed=seed)}, anchors, stages


def levit_pair(seed=0):
    c = LEVIT_PAIR
    anchors = [tiny_levit(e, h, c["img"], c["key_dim"], seed + a) for a, (e, h) in enumerate(c["anchors"])]
    stages = (0, 1)
    _, counts = public_configs([(4, 4, 4)] * 2, stages)
    state = prefixed([levit_public(m, c["img"]) for m in anchors])
    return {**state, **stitch_tensors(counts, stages, [e for e, _ in c["anchors"]], conv=False, seed=seed)}, anchors, stages


# ---- public containers ------------------------------------------------------------------------------

def save_swin(path, state):
    """stitching_swin/utils.py save_checkpoint (its ``config`` is a yacs CfgNode; a plain dict here)."""
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"last_epoch": 3},
                "max_accuracy": 83.2, "scaler": {"scale": 65536.0}, "epoch": 3,
                "config": {"MODEL": {"TYPE": "snnet"}, "DATA": {"IMG_SIZE": 224}}}, path)


def save_timm(path, state, ema=None):
    """timm 0.6 CheckpointSaver (stitching_resnet_swin): ``state_dict`` and, with EMA, ``state_dict_ema``."""
    container = {"epoch": 3, "arch": "snnet", "state_dict": state, "optimizer": {"state": {}, "param_groups": []},
                 "version": 2, "args": argparse.Namespace(model="snnet", epochs=30), "metric": 77.0}
    if ema is not None:
        container["state_dict_ema"] = ema
    torch.save(container, path)


def save_deit(path, state):
    """stitching_levit/main.py: ``model``, optimizer, scheduler, epoch, scaler, args."""
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"last_epoch": 3},
                "epoch": 3, "scaler": {"scale": 65536.0},
                "args": argparse.Namespace(model="snnet", epochs=50)}, path)


# ---- reference forward: timm submodules in the public code's order -----------------------------------

def _stitch(x, state, stages, cfg, conv):
    p = f"stitch_layers.{stages.index(cfg['stage_id'])}.{cfg['comb_id'][0]}.{cfg['stitch_layers'][0]}.transform."
    return F.conv2d(x, state[p + "weight"], state[p + "bias"]) if conv else F.linear(x, state[p + "weight"], state[p + "bias"])


def _ms_layer(m: SwinTransformer, i, x, start=None, end=None):
    """The public BasicLayer: blocks[start:end+1], then its patch merging unless stopped early."""
    for b, blk in enumerate(m.layers[i].blocks):
        if start is not None and b < start:
            continue
        x = blk(x)
        if end is not None and b == end:
            break
    if end is None and i + 1 < len(m.layers):
        x = m.layers[i + 1].downsample(x)
    return x


def swin_until(m, x, s, j):
    x = m.patch_embed(x)
    for i in range(s + 1):
        x = _ms_layer(m, i, x, end=j if i == s else None)
    return x


def swin_from(m, x, s, k):
    for i in range(s, len(m.layers)):
        x = _ms_layer(m, i, x, start=k if i == s else None)
    x = m.norm(x).mean((1, 2))
    return F.linear(x, m.head.fc.weight, m.head.fc.bias)


def resnet_until(m, x, s, j):
    x = m.maxpool(m.act1(m.bn1(m.conv1(x))))
    for s_id, layer in enumerate([m.layer1, m.layer2, m.layer3, m.layer4]):
        for b_id, blk in enumerate(layer):
            x = blk(x)
            if s_id == s and b_id == j:
                break
        if s_id == s:
            break
    return x


def resnet_from(m, x, s, k):
    for s_id, layer in enumerate([m.layer1, m.layer2, m.layer3, m.layer4]):
        if s_id >= s:
            for blk in (layer[k:] if s_id == s else layer):
                x = blk(x)
    return m.fc(m.global_pool(x))


def levit_flat(m: LevitDistilled):
    """The public flat ``blocks``: residual attention / MLP pairs; between stages subsample, residual MLP."""
    flat = []
    for s, stage in enumerate(m.stages):
        if s:
            flat += [stage.downsample.attn_downsample, lambda x, mlp=stage.downsample.mlp: x + mlp(x)]
        for blk in stage.blocks:
            flat += [lambda x, a=blk.attn: x + a(x), lambda x, f=blk.mlp: x + f(x)]
    return flat


def levit_until(m, x, s, j):
    x = m.stem(x).flatten(2).transpose(1, 2)
    for blk in levit_flat(m)[:s * 10 + (j + 1) * 2]:  # the public code's index, for depth-4 stages
        x = blk(x)
    return x


def levit_from(m, x, s, k):
    for blk in levit_flat(m)[s * 10 + k * 2:]:
        x = blk(x)
    x = x.mean(1)
    return (m.head(x) + m.head_dist(x)) / 2


def to_tokens_nhwc(x):
    """The public CNN->Swin reshape ``reshape(B, C, -1).permute(0, 2, 1)``, then the Swin block's
    ``view(B, H, W, C)``: timm's Swin takes that NHWC tensor directly."""
    b, c, h, w = x.shape
    return x.reshape(b, c, -1).permute(0, 2, 1).reshape(b, h, w, c)


def reference_forward(kind, anchors, state, stages, cfg, x):
    """The public SNNet.forward of config ``cfg`` (a reference-JSON style dict)."""
    comb = cfg["comb_id"]
    if len(comb) == 1:
        return anchors[comb[0]](x)
    (a, b), ((j, k),), s = comb, cfg["stitch_cfgs"], cfg["stage_id"]
    until, since = {"swin": (swin_until, swin_from), "resnet": (resnet_until, resnet_from),
                    "resnet_swin": (resnet_until, swin_from), "levit": (levit_until, levit_from)}[kind]
    y = _stitch(until(anchors[a], x, s, j), state, stages, cfg, conv=kind.startswith("resnet"))
    return since(anchors[b], to_tokens_nhwc(y) if kind == "resnet_swin" else y, s, k)


# ---- FLOPs from the architecture (fvcore convention) ---------------------------------------------------

def swin_flops(embed, depths, img, patch, window, classes, in_chans=3, mlp=4):
    """Patch embed conv + norm; per block 2 LayerNorms, 4 linears, q.k^T and attn.v inside windows;
    patch merging norm + reduction; final norm and head."""
    r, c = img // patch, embed
    f = r * r * in_chans * patch * patch * c + 5 * r * r * c
    for s, d in enumerate(depths):
        if s:
            f += 5 * r * r * c + (r // 2) ** 2 * 4 * c * 2 * c
            r, c = r // 2, c * 2
        n, w = r * r, min(window, r)
        f += d * (2 * 5 * n * c + n * c * 3 * c + n * c * c + 2 * n * c * mlp * c + 2 * n * w * w * c)
    return f + 5 * r * r * c + c * classes


def levit_flops(embed, heads, key_dim, depth, img, classes, distilled=True):
    """Stem (4 conv + BN), per block: qkv/proj Linear+BN, q.k^T, attn.v, MLP (ratio 2); subsample
    attention (heads = C / key_dim, value ratio 4) + MLP; BN + Linear heads."""
    f, r, chans = 0, img, [3, embed[0] // 8, embed[0] // 4, embed[0] // 2, embed[0]]
    for i in range(4):
        r = (r - 1) // 2 + 1
        f += r * r * chans[i + 1] * chans[i] * 9 + 2 * r * r * chans[i + 1]

    def lin_bn(n, cin, cout):
        return n * cin * cout + 2 * n * cout

    def mlp(n, c):
        return lin_bn(n, c, 2 * c) + lin_bn(n, 2 * c, c)

    for s, c in enumerate(embed):
        if s:
            ci, h, vd, n, r2 = embed[s - 1], embed[s - 1] // key_dim, 4 * key_dim, r * r, (r - 1) // 2 + 1
            f += lin_bn(n, ci, h * (key_dim + vd)) + lin_bn(r2 * r2, ci, h * key_dim)
            f += h * r2 * r2 * n * (key_dim + vd) + lin_bn(r2 * r2, h * vd, c) + mlp(r2 * r2, c)
            r = r2
        n, h, vd = r * r, heads[s], 2 * key_dim
        f += depth[s] * (lin_bn(n, c, h * (2 * key_dim + vd)) + h * n * n * (key_dim + vd) + lin_bn(n, h * vd, c) + mlp(n, c))
    return f + (2 if distilled else 1) * (2 * embed[-1] + embed[-1] * classes)


def resnet_flops(m: ResNet, img):
    """Counted while it runs: conv multiply-adds, 2 per BatchNorm output, 1 per pooled input, fc."""
    total = [0]

    def hook(mod, inputs, out):
        if isinstance(mod, nn.Conv2d):
            total[0] += out.numel() * mod.in_channels // mod.groups * math.prod(mod.kernel_size)
        elif isinstance(mod, nn.BatchNorm2d):
            total[0] += 2 * out.numel()
        elif isinstance(mod, nn.AdaptiveAvgPool2d):
            total[0] += inputs[0].numel()
        elif isinstance(mod, nn.Linear):
            total[0] += mod.in_features * mod.out_features
    handles = [mod.register_forward_hook(hook) for mod in m.modules()]
    with torch.no_grad():
        m(torch.zeros(1, 3, img, img))
    for h in handles:
        h.remove()
    return total[0]
