"""The model side against the public SN-Net code: enumeration, forward, cost, anchors, containers.

Expected values come from the public enumerations (REFERENCE_DIR), the published FLOPs, the
independent reference forward and term-by-term counts in snnet_reference.py, never from the code.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import timm
import torch
from timm.layers import LayerScale
from torch import nn

import stitch_compile as sc
from stitch_compile.errors import StitchError
from stitch_compile.model import read_state_dict
from stitch_compile.model.families import snnet_v1, snnet_v2
from stitch_compile.model.families.vit_anchor import detect_vit, vit_segments
from snnet_reference import (V1_NAMED, V1_SHAPE, V2_NAMED, V2_SHAPE, block_flops, head_flops, images,
                             plan_cost, rel_err, save_public, stem_flops, v1_cost, v1_forward, v1_reference,
                             v2_fields, v2_forward, v2_plan, v2_reference, vit_flops, write_v1)

TOL = 1e-5
V2_NETS = [("v2_net", "v2_ckpt", (12, 24)), ("v2_12_net", "v2_12_ckpt", (12, 12))]
UNUSED_V2_ID = 13  # small->large at the last block: enumerated, never used by the public code
PUBLISHED_FLOPS = {  # SNNET_FORMATS.md, fvcore convention
    "deit_tiny_patch16_224": 1_258_411_200, "deit_small_patch16_224": 4_608_338_304,
    "deit_base_patch16_224": 17_582_740_224, "deit3_small_patch16_224": 4_608_338_304,
    "deit3_large_patch16_224": 61_604_135_936,
}


def _v2(request, net_name, ckpt_name):
    return request.getfixturevalue(net_name), request.getfixturevalue(ckpt_name)[1]


def _fields(net):
    return [(c.anchors, c.positions, c.layers) for c in net.configs]


# ---- 1. enumeration ---------------------------------------------------------------------------

def test_v1_enumeration_matches_reference():
    table, layers_per_pair = v1_reference()
    assert snnet_v1.enumerate_configs(12, 3) == table
    positions, _, n_layers = snnet_v1.stitch_positions(12)
    assert (len(positions), n_layers) == (34, layers_per_pair)


def test_v1_net_configs_match_reference(v1_net):
    table, _ = v1_reference()
    assert v1_net.configs.ids == list(range(71))
    assert _fields(v1_net) == table


@pytest.mark.parametrize("depths", [(12, 12), (12, 24)])
def test_v2_enumeration_matches_reference(depths):
    ref = v2_reference(depths)
    configs, unused = snnet_v2.enumerate_configs(*depths)
    assert configs == ref
    assert unused == {UNUSED_V2_ID}
    assert ref[UNUSED_V2_ID]["comb_id"] == [0, 1] and ref[UNUSED_V2_ID]["stitch_cfgs"][0][0] == depths[0] - 1


@pytest.mark.parametrize("net_name, ckpt_name, depths", V2_NETS)
def test_v2_net_configs_match_reference(request, net_name, ckpt_name, depths):
    net, _ = _v2(request, net_name, ckpt_name)
    ref = v2_reference(depths)
    assert len(ref) == 135 and len(net.configs) == 134
    assert net.configs.ids == [i for i in range(135) if i != UNUSED_V2_ID]
    for c in net.configs:
        r = ref[c.id]
        assert list(c.anchors) == r["comb_id"]
        assert [list(p) for p in c.positions] == r.get("stitch_cfgs", [])
        assert list(c.layers) == r.get("stitch_layer_ids", [])
        assert c.to_json().get("ranges", []) == r.get("route", [])
    with pytest.raises(StitchError, match=r"unknown config id 13: valid ids are 0-12, 14-134"):
        net.configs[UNUSED_V2_ID]
    with pytest.raises(StitchError, match="13"):
        net(images(), UNUSED_V2_ID)
    for not_an_id in (True, 1.0, "1"):  # ids are integers: not converted into config 1
        with pytest.raises(StitchError, match=f"unknown config id {not_an_id!r}"):
            net.configs[not_an_id]
        assert not_an_id not in net.configs
    assert net.configs[np.int64(1)] is net.configs[1] and np.int64(1) in net.configs


# ---- 2. forward against the independent reference --------------------------------------------

def _mismatches(outputs: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[int, float]:
    errs = {cid: rel_err(y, r) for cid, (y, r) in outputs.items()}
    return {cid: e for cid, e in errs.items() if not e < TOL}


@torch.no_grad()
def test_v1_forward_every_config(v1_ckpt, v1_net):
    state, x = v1_ckpt[1], images()
    table, _ = v1_reference()
    out = {cid: (v1_net(x, cid), v1_forward(state, x, *fields)) for cid, fields in enumerate(table)}
    assert len(out) == 71 and _mismatches(out) == {}


@torch.no_grad()
@pytest.mark.parametrize("net_name, ckpt_name, depths", V2_NETS)
def test_v2_forward_every_config(request, net_name, ckpt_name, depths):
    net, state = _v2(request, net_name, ckpt_name)
    x = images()
    ref = v2_reference(depths)
    out = {c.id: (net(x, c.id), v2_forward(state, x, *v2_fields(ref[c.id]))) for c in net.configs}
    assert len(out) == 134 and _mismatches(out) == {}


@torch.no_grad()
def test_v1_stitched_configs_skip_the_final_norm(v1_ckpt, v1_net):
    """The public v1 code ends stitched configs with forward_head (no norm): applying it differs."""
    state, x = v1_ckpt[1], images()
    table, _ = v1_reference()
    for cid in (3, 36, 37, 70):  # first and last position of each pair
        y = v1_net(x, cid)
        assert rel_err(y, v1_forward(state, x, *table[cid])) < TOL
        assert rel_err(y, v1_forward(state, x, *table[cid], stitched_norm=True)) > 1e-2


# ---- 3. FLOPs and params ----------------------------------------------------------------------

@pytest.mark.parametrize("name, published", PUBLISHED_FLOPS.items())
def test_published_anchor_flops(name, published):
    with torch.device("meta"):  # the analytic count reads shapes only; no weights are allocated
        vit = timm.create_model(name, pretrained=False)
    segments = vit_segments(0, vit)
    route = ["stem:0", *(f"block:0:{i}" for i in range(len(vit.blocks))), "head:0"]
    assert sum(segments[k].flops for k in route) == published
    assert vit_flops(vit.embed_dim, len(vit.blocks), 197, 196, 16, 1000) == published


def test_stitched_flops_term_by_term(v1_net):
    """Config 5 = Ti->S at (1, 0): stem of A, blocks 0-1 of A, N*Ca*Cb, all 12 blocks of B, head."""
    table, _ = v1_reference()
    assert table[5] == ((0, 1), ((1, 0),), (0,))
    n, (ca, cb) = 17, V1_SHAPE["widths"][:2]
    expected = (stem_flops(16, 8, ca) + 2 * block_flops(n, ca, 4 * ca) + n * ca * cb
                + 12 * block_flops(n, cb, 4 * cb) + head_flops(n, cb, 10, norm=False))
    assert v1_net.configs[5].flops == expected


def test_v1_costs_every_config(v1_ckpt, v1_net):
    state = v1_ckpt[1]
    table, _ = v1_reference()
    for cid, (comb, cfgs, layers) in enumerate(table):
        c = v1_net.configs[cid]
        assert (c.flops, c.params) == v1_cost(state, comb, cfgs, layers, 32), cid
        assert c.flops == sum(v1_net.segments[k].flops for k in c.route)


@pytest.mark.parametrize("net_name, ckpt_name, depths", V2_NETS)
def test_v2_costs_every_config(request, net_name, ckpt_name, depths):
    net, state = _v2(request, net_name, ckpt_name)
    ref = v2_reference(depths)
    for c in net.configs:
        assert (c.flops, c.params) == plan_cost(state, v2_plan(state, *v2_fields(ref[c.id])), True, 32), c.id
        assert c.flops == sum(net.segments[k].flops for k in c.route)


# ---- 4. anchor detection and --anchors --------------------------------------------------------

@pytest.mark.parametrize("name", PUBLISHED_FLOPS)
def test_detects_real_timm_anchors(name):
    """The spec read from a real timm model's state dict (shapes only) describes that model."""
    with torch.device("meta"):
        vit = timm.create_model(name, pretrained=False)
    spec = detect_vit(vit.state_dict(), name)
    assert spec.embed_dim == vit.embed_dim and spec.depth == len(vit.blocks)
    assert spec.num_heads == vit.blocks[0].attn.num_heads == vit.embed_dim // 64
    assert (spec.patch_size, spec.img_size, spec.num_classes) == (16, 224, 1000)
    assert spec.no_embed_class == vit.no_embed_class == name.startswith("deit3")
    assert spec.layer_scale == isinstance(vit.blocks[0].ls1, LayerScale)


def _check_anchor(vit, width, depth, deit3, state, prefix):
    assert (vit.embed_dim, len(vit.blocks), vit.num_classes) == (width, depth, 10)
    assert tuple(vit.patch_embed.patch_size) == (8, 8) and tuple(vit.patch_embed.img_size) == (32, 32)
    assert vit.blocks[0].attn.num_heads == width // 64
    assert vit.no_embed_class == deit3 and vit.pos_embed.shape[1] == (16 if deit3 else 17)
    if deit3:
        assert torch.equal(vit.blocks[-1].ls2.gamma, state[f"{prefix}blocks.{depth - 1}.gamma_2"])
    else:
        assert isinstance(vit.blocks[0].ls1, nn.Identity)


def test_v1_anchor_detection(v1_ckpt, v1_net):
    for a, width in enumerate(V1_SHAPE["widths"]):
        _check_anchor(v1_net.anchors[a], width, 12, False, v1_ckpt[1], f"anchors.{a}.")
        assert v1_net.describe()["anchors"][a] == {
            "name": f"vit_d{width}_l12_p8_32", "embed_dim": width, "depth": 12, "tokens": 17,
            "num_classes": 10, "img_size": [32, 32]}


def test_v2_anchor_detection(v2_ckpt, v2_net):
    for a, (width, depth) in enumerate(zip(V2_SHAPE["widths"], V2_SHAPE["depths"])):
        _check_anchor(v2_net.anchors[a], width, depth, True, v2_ckpt[1], f"anchors.{a}.")
    assert v2_net.family == "snnetv2_deit3" and v2_net.input_shape == (3, 32, 32)


@torch.no_grad()
@pytest.mark.parametrize("anchors", [V1_NAMED, ",".join(V1_NAMED)], ids=["list", "comma-string"])
def test_anchors_override_v1(v1_ckpt, anchors):
    path, state = v1_ckpt
    net = sc.load(str(path), anchors=anchors)
    assert net.anchor_names == V1_NAMED and len(net.configs) == 71
    table, _ = v1_reference()
    x = images()
    for cid in (2, 5, 40):
        assert rel_err(net(x, cid), v1_forward(state, x, *table[cid])) < TOL


@torch.no_grad()
def test_anchors_override_v2(v2_ckpt):
    path, state = v2_ckpt
    net = sc.load(str(path), anchors=V2_NAMED)
    assert net.anchor_names == V2_NAMED and len(net.configs) == 134
    ref, x = v2_reference((12, 24)), images()
    for cid in (1, 20, 80, 134):
        assert rel_err(net(x, cid), v2_forward(state, x, *v2_fields(ref[cid]))) < TOL


@pytest.mark.parametrize("anchors, match", [
    (["no_such_model", "b", "c"], "unknown timm model 'no_such_model'"),
    (V1_NAMED[:2], "2 names given but the checkpoint holds 3 anchors"),
    (["deit_small_patch16_224", *V1_NAMED[1:]], r"anchors\.0\..*shape mismatch"),
])
def test_bad_anchors_python(v1_ckpt, anchors, match):
    with pytest.raises(StitchError, match=match):
        sc.load(str(v1_ckpt[0]), anchors=anchors)


@pytest.mark.parametrize("x", [torch.zeros(2, 3, 16, 16), torch.zeros(3, 32, 32), torch.zeros(2, 1, 32, 32),
                               np.zeros((2, 3, 32, 32), np.float32)], ids=["small", "no-batch", "grey", "numpy"])
def test_forward_names_the_input_it_takes(v1_net, x):
    """Instead of timm's assertion or a convolution's shape error deep inside a route."""
    with pytest.raises(StitchError, match=r"this network takes a tensor \[batch, 3, 32, 32\]"):
        v1_net(x, 0)


# ---- 5. Learngene-Pool-style checkpoints ------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("widths, depth", [((64, 128, 128, 192), 6), ((64, 64, 128, 192), 9)])
def test_learngene_pool(tmp_path, widths, depth):
    """4 anchors of 6 or 9 blocks; the equal-width pair has no stitching layers (identity)."""
    path = tmp_path / "pool.pth"
    state = write_v1(path, widths=widths, depth=depth)
    net = sc.load(str(path))
    n_positions = 3 * depth - 2  # a 2-block window: 4 positions at its first place, 3 new at each later one
    assert len(net.configs) == len(widths) + (len(widths) - 1) * n_positions
    table, _ = v1_reference()
    per_pair = [(cfgs, layers) for comb, cfgs, layers in table if comb == (0, 1) and max(cfgs[0]) < depth]
    expected = [((a,), (), ()) for a in range(len(widths))]
    expected += [((p, p + 1), cfgs, layers) for p in range(len(widths) - 1) for cfgs, layers in per_pair]
    assert _fields(net) == expected
    identity = next(p for p in range(len(widths) - 1) if widths[p] == widths[p + 1])
    assert not any(k.startswith(f"stitch:{identity}:") for c in net.configs for k in c.route)
    x = images()
    for c in net.configs:
        comb, cfgs, layers = expected[c.id]
        assert rel_err(net(x, c.id), v1_forward(state, x, comb, cfgs, layers)) < TOL, c.id
        assert (c.flops, c.params) == v1_cost(state, comb, cfgs, layers, 32), c.id


# ---- 6. containers ----------------------------------------------------------------------------

def _prefixed(state):
    return {"module." + k: v for k, v in state.items()}


CONTAINERS = {
    "state_dict": (lambda s: {"state_dict": s, "epoch": 5, "arch": "snnet"}, "state_dict"),
    "state_dict_ema": (lambda s: {"state_dict_ema": s, "epoch": 5}, "state_dict_ema"),
    "bare": (lambda s: s, "bare"),
    "module-prefixed model": (lambda s: {"model": _prefixed(s), "args": argparse.Namespace(lr=1)}, "model"),
    "module-prefixed bare": (_prefixed, "bare"),
}


@torch.no_grad()
@pytest.mark.parametrize("kind", ["model", *CONTAINERS])
def test_containers_load(tmp_path, small_v1_state, kind):
    path = tmp_path / "ckpt.pth"
    if kind == "model":  # the public code's container: optimizer, scheduler, args Namespace
        save_public(path, small_v1_state, stitch_kernel=2)
        label = "model"
    else:
        wrap, label = CONTAINERS[kind]
        torch.save(wrap(small_v1_state), path)
    state, container = read_state_dict(str(path))
    assert container == label and state.keys() == small_v1_state.keys()
    net = sc.load(str(path))
    assert len(net.configs) == 3 + 2 * 4
    x, stitched = images(), ((0, 1), ((1, 0),), (0,))
    assert net.configs[5].positions == stitched[1]
    assert rel_err(net(x, 5), v1_forward(small_v1_state, x, *stitched)) < TOL


# ---- real size (opt-in: writes a ~470 MB checkpoint) ------------------------------------------

@pytest.mark.slow
@torch.no_grad()
def test_real_size_deit_ti_s_b(tmp_path):
    """DeiT Ti/S/B at 224 px, 1000 classes: published FLOPs, timm's param counts, --anchors by bare name."""
    path = tmp_path / "snnet_deit.pth"
    state = write_v1(path, widths=(192, 384, 768), depth=12, img=224, patch=16, classes=1000)
    net = sc.load(str(path))
    deit = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
    for a, name in enumerate(deit):
        with torch.device("meta"):
            params = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
        assert (net.configs[a].flops, net.configs[a].params) == (PUBLISHED_FLOPS[name], params)
    table, _ = v1_reference()
    for cid, fields in enumerate(table):
        assert (net.configs[cid].flops, net.configs[cid].params) == v1_cost(state, *fields, 224), cid
    named = sc.load(str(path), anchors=deit)
    x = images(img=224)
    for cid in (0, 2, 5, 52):
        reference = v1_forward(state, x, *table[cid])
        assert rel_err(net(x, cid), reference) < TOL and rel_err(named(x, cid), reference) < TOL
