"""SN-Net v1 Swin-T/S/B, ResNet-18/50, ResNet-18/Swin-T and LeViT-192/256 against the public code.

Expected values come from the public enumerations (REFERENCE_DIR), the published per-config FLOPs
and params (the public code's results files, fvcore), and staged_reference.py (public layouts,
reference forward over timm submodules in the public order, architecture FLOP counts), never
from stitch_compile itself.
"""

from __future__ import annotations

import ast
import functools
import io
import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch

import stitch_compile as sc
from stitch_compile.errors import StitchError
from stitch_compile.model import build_network, describe_route, read_state_dict
from stitch_compile.model.families.levit_anchor import detect_levit
from stitch_compile.model.families.resnet_anchor import detect_resnet
from stitch_compile.model.families.stages import enumerate_configs
from stitch_compile.model.families.swin_anchor import detect_swin
from snnet_reference import REFERENCE_DIR
from staged_reference import (LEVIT_PAIR, RESNET_SWIN, SWIN_TSB, empty, levit_flops, levit_pair, levit_public,
                              public_configs, reference_forward, resnet_flops, resnet_pair, resnet_swin, save_deit,
                              save_swin, save_timm, stitch_tensors, swin_flops, swin_public, swin_tsb)

TOL = 1e-5

# kind: family name, reference file, the published anchors' stage depths, stitched stages, tiny writer,
# container writer, test image size
FAMILIES = {
    "swin": ("snnet_v1_swin", "swin_t_s_b", [[2, 2, 6, 2], [2, 2, 18, 2], [2, 2, 18, 2]], (0, 1, 2), swin_tsb, save_swin, SWIN_TSB["img"]),
    "resnet": ("snnet_v1_resnet", "resnet18_resnet50", [[2, 2, 2, 2], [3, 4, 6, 3]], (1, 2), resnet_pair, save_timm, 224),
    "resnet_swin": ("snnet_v1_resnet_swin", "resnet18_swin_ti", [[2, 2, 2, 2], [2, 2, 6, 2]], (1, 2), resnet_swin, save_timm, RESNET_SWIN["img"]),
    "levit": ("snnet_v1_levit", "levit_192_256", [[4, 4, 4], [4, 4, 4]], (0, 1), levit_pair, save_deit, LEVIT_PAIR["img"]),
}

# The public results files (stitching_*/results/*.txt): fvcore FLOPs per config id at 224 px, and the
# Swin code's get_model_size per config.
PUBLISHED_FLOPS = {
    "swin": [4509194496, 8768534784, 15467826176, 8797436160, 15220458496, 8797436160, 14619249664, 8797436160,
             8442491136, 8442491136, 8087546112, 7732601088, 7732601088, 7377656064, 7022711040, 7022711040,
             6667766016, 6312820992, 6312820992, 5957875968, 5602930944, 5602930944, 5247985920, 4893040896,
             14026420224, 13753964544, 13481508864, 13209053184, 12936597504, 12664141824, 12391686144,
             12119230464, 11846774784, 11574319104, 11301863424, 11029407744, 10756952064, 10484496384,
             10212040704, 9939585024, 9667129344],
    "resnet": [1819065856, 4111512576, 3755463680, 3767505920, 3547935744, 3134686208, 2915718144, 2928161792,
               2709193728, 2490225664],
    "resnet_swin": [1819065856, 4509194496, 4095543552, 3730713856, 3375768832, 3252235520, 2897290496, 2542345472],
    "levit": [661663808, 1133412864, 1020918272, 977741824, 934565376, 812300576, 791247040, 770193504],
}
PUBLISHED_SWIN_PARAMS = [
    28288354, 49606258, 87768224, 49615570, 87692407, 49568818, 87165468, 49383154, 47606662, 47606662, 45830170,
    44053678, 44053678, 42277186, 40500694, 40500694, 38724202, 36947710, 36947710, 35171218, 33394726, 33394726,
    31618234, 29841742, 85063014, 83684418, 82305822, 80927226, 79548630, 78170034, 76791438, 75412842, 74034246,
    72655650, 71277054, 69898458, 68519862, 67141266, 65762670, 64384074, 63005478]


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request, tmp_path_factory):
    """(kind, state, timm anchors, stages, loaded net) for a tiny checkpoint written in the public container."""
    kind = request.param
    name, _, _, _, writer, saver, _ = FAMILIES[kind]
    state, anchors, stages = writer()
    path = tmp_path_factory.mktemp(kind) / "checkpoint.pth"
    saver(path, state)
    return kind, state, anchors, stages, sc.load(str(path))


def _fields(configs):
    return [{"comb_id": list(c["comb_id"]), **({"stage_id": c["stage_id"]} if "stage_id" in c else {}),
             "stitch_cfgs": [list(p) for p in c["stitch_cfgs"]], "stitch_layers": list(c["stitch_layers"])}
            for c in configs]


def _net_fields(net):
    return _fields([{"comb_id": c.anchors, **({"stage_id": c.extra["stage_id"]} if "stage_id" in c.extra else {}),
                     "stitch_cfgs": c.positions, "stitch_layers": c.layers} for c in net.configs])


# ---- 1. enumeration -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(FAMILIES))
def test_enumeration_matches_public_reference(kind):
    _, ref_name, depths, stages, *_ = FAMILIES[kind]
    ref = json.loads((REFERENCE_DIR / f"snnet_v1_{ref_name}.configs.json").read_text())
    expected = [ref["configs"][str(i)] for i in range(ref["num_configs"])]
    configs, n_layers = enumerate_configs(depths, stages)
    got = [{"comb_id": list(c.comb), **({"stage_id": c.stage} if c.stage is not None else {}),
            "stitch_cfgs": [list(c.position)] if c.position else [], "stitch_layers": [c.layer] if c.position else []}
           for c in configs]
    assert got == _fields(expected)
    info = {s: [(n_layers[(s, p)], (p, p + 1)) for p in range(len(depths) - 1)] for s in stages}
    assert info == ast.literal_eval(ref["stitch_layer_info"])
    assert _fields(public_configs(depths, stages)[0]) == _fields(expected)  # the test-side re-derivation too


def _depths(anchors):
    """Blocks per stage of the test's own timm anchors."""
    return [[len(s.blocks) for s in m.layers] if hasattr(m, "patch_embed") else  # Swin
            [len(s.blocks) for s in m.stages] if hasattr(m, "stages") else  # LeViT
            [len(getattr(m, f"layer{i}")) for i in range(1, 5)] for m in anchors]  # ResNet


def test_loaded_configs_follow_the_public_enumeration(tiny):
    kind, _, anchors, stages, net = tiny
    assert net.family == FAMILIES[kind][0]
    assert net.configs.ids == list(range(len(net.configs)))
    assert _net_fields(net) == _fields(public_configs(_depths(anchors), stages)[0])


# ---- 2. forward ----------------------------------------------------------------------------------

def test_every_config_matches_the_public_forward(tiny):
    kind, state, anchors, stages, net = tiny
    x = torch.randn(2, 3, FAMILIES[kind][6], FAMILIES[kind][6], generator=torch.Generator().manual_seed(3))
    table = public_configs(_depths(anchors), stages)[0]
    with torch.no_grad():
        for config, cfg in zip(net.configs, table):
            y = x
            for key in config.route:  # every segment receives what it declares
                assert tuple(y.shape[1:]) == net.segments[key].in_shape, (config.id, key)
                y = net.segments[key].module(y)
            ref = reference_forward(kind, anchors, state, stages, cfg, x)
            assert y.shape == ref.shape == (2, 10)
            assert (y - ref).abs().max() <= TOL * ref.abs().max(), (kind, config.id, describe_route(config.route))
            assert torch.equal(net(x, config.id), y)


# ---- 3. cost ---------------------------------------------------------------------------------------

def test_anchor_flops_and_params_from_the_architecture(tiny):
    kind, _, anchors, _, net = tiny
    expected = []
    for m in anchors:
        if hasattr(m, "patch_embed"):
            expected.append(swin_flops(m.embed_dim, [len(s.blocks) for s in m.layers], m.patch_embed.img_size[0],
                                       m.patch_embed.patch_size[0], m.layers[0].blocks[0].window_size[0], 10))
        elif hasattr(m, "stages"):
            expected.append(levit_flops(m.embed_dim, [s.blocks[0].attn.num_heads for s in m.stages],
                                        LEVIT_PAIR["key_dim"], (4, 4, 4), LEVIT_PAIR["img"], 10))
        else:
            expected.append(resnet_flops(m, FAMILIES[kind][6]))
    anchor_configs = [c for c in net.configs if c.is_anchor]
    assert [c.flops for c in anchor_configs] == expected
    assert [c.params for c in anchor_configs] == [sum(p.numel() for p in m.parameters()) for m in anchors]


REAL = {  # timm names of the published anchors and their widths per stage
    "swin": (["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224"],
             [[96, 192, 384, 768], [96, 192, 384, 768], [128, 256, 512, 1024]]),
    "resnet": (["resnet18", "resnet50"], [[64, 128, 256, 512], [256, 512, 1024, 2048]]),
    "resnet_swin": (["resnet18", "swin_tiny_patch4_window7_224"], [[64, 128, 256, 512], [96, 192, 384, 768]]),
    "levit": (["levit_192", "levit_256"], [[192, 288, 384], [256, 384, 512]]),
}


def _public_anchor(name):
    m = empty(lambda: timm.create_model(name))
    return swin_public(m, 224, 4, 7) if name.startswith("swin") else levit_public(m, 224) if name.startswith("levit") else m.state_dict()


def _real_state(kind):
    """The published anchors at full size (uninitialised values) in the public layout, with stitching layers."""
    names, dims = REAL[kind]
    _, _, depths, stages, *_ = FAMILIES[kind]
    state = {f"anchors.{a}.{k}": v for a, name in enumerate(names) for k, v in _public_anchor(name).items()}
    return {**state, **stitch_tensors(public_configs(depths, stages)[1], stages, dims, conv=kind.startswith("resnet"))}


@pytest.mark.parametrize("kind", [pytest.param("swin", marks=pytest.mark.slow), "resnet", "resnet_swin", "levit"])
def test_published_flops_and_params(kind):
    """Full-size anchors (Swin-T/S/B: 166M parameters, ~10 s, so marked slow)."""
    net = build_network(_real_state(kind))
    assert net.family == FAMILIES[kind][0]
    assert [c.flops for c in net.configs] == PUBLISHED_FLOPS[kind]
    if kind == "swin":
        assert [c.params for c in net.configs] == PUBLISHED_SWIN_PARAMS


# ---- 4. detection, containers, overrides ---------------------------------------------------------

def test_anchor_architecture_read_from_tensors():
    state, *_ = swin_tsb()
    spec = detect_swin({k[len("anchors.2."):]: v for k, v in state.items() if k.startswith("anchors.2.")}, "anchors.2")
    assert (spec.embed_dim, spec.depths, spec.num_heads, spec.window_size, spec.patch_size, spec.img_size, spec.num_classes) == \
        (12, (2, 2, 6, 2), (1, 2, 3, 4), 2, 2, 32, 10)
    state, *_ = resnet_swin()
    assert detect_swin({k[10:]: v for k, v in state.items() if k.startswith("anchors.1.")}, "anchors.1").img_size == 64
    resnet = detect_resnet({k[10:]: v for k, v in state.items() if k.startswith("anchors.0.")}, "anchors.0")
    assert (resnet.bottleneck, resnet.layers, resnet.channels) == (False, (2, 2, 2, 2), (8, 16, 32, 64))
    state, *_ = levit_pair()
    levit = detect_levit({k[10:]: v for k, v in state.items() if k.startswith("anchors.1.")}, "anchors.1")
    assert (levit.embed_dim, levit.depth, levit.num_heads, levit.key_dim, levit.img_size, levit.distilled) == \
        ((24, 32, 40), (4, 4, 4), (3, 4, 5), 4, 128, True)


def test_vit_families_are_still_detected():
    from snnet_reference import v1_state, v2_state
    assert build_network(v1_state(depth=2)).family == "snnet_v1_vit"
    assert build_network(v2_state(depths=(2, 4))).family == "snnetv2_deit3"


def test_containers_as_the_public_code_saves_them(tmp_path):
    state, *_ = resnet_pair()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    save_timm(tmp_path / "r.pth", state, ema=ema)
    loaded, container = read_state_dict(str(tmp_path / "r.pth"))
    assert container == "state_dict" and all(torch.equal(loaded[k], v) for k, v in state.items())
    state, *_ = swin_tsb()
    save_swin(tmp_path / "s.pth", state)
    assert read_state_dict(str(tmp_path / "s.pth"))[1] == "model"


def test_anchors_override_by_timm_name():
    state = _real_state("resnet")
    net = build_network(state, ["resnet18", "resnet50"])
    assert net.anchor_names == ["resnet18", "resnet50"] and net.configs[1].flops == PUBLISHED_FLOPS["resnet"][1]
    with pytest.raises(StitchError, match=r"missing tensor anchors\.0\.layer1\.2\."):
        build_network(state, ["resnet34", "resnet50"])
    with pytest.raises(StitchError, match="not a timm ResNet"):
        build_network(state, ["levit_128s", "resnet50"])
    with pytest.raises(StitchError, match="1 names given"):
        build_network(state, ["resnet18"])


# ---- 5. bad input: one clear line -------------------------------------------------------------------

def _drop(key):
    return lambda s: s.pop(key)


def _set(key, value):
    return lambda s: s.__setitem__(key, value)


BAD = [
    ("swin", _drop("anchors.1.layers.2.blocks.3.mlp.fc1.weight"), r"missing tensor anchors\.1\.layers\.2\.blocks\.3\.mlp\.fc1\.weight"),
    ("swin", _set("anchors.0.layers.0.blocks.0.extra", torch.zeros(1)), r"unexpected tensor anchors\.0\.layers\.0\.blocks\.0\.extra"),
    ("swin", _set("anchors.2.layers.1.downsample.reduction.weight", torch.zeros(48, 95)),
     r"anchors\.2\.layers\.1\.downsample\.reduction\.weight: shape mismatch: checkpoint \[48, 95\] vs anchor \[48, 96\]"),
    ("swin", _set("anchors.0.layers.0.blocks.1.attn_mask", torch.zeros(64, 4, 4)), r"anchors\.0\.layers\.0\.blocks\.1\.attn_mask: differs"),
    ("swin", _set("stitch_layers.2.0.1.transform.weight", torch.zeros(32, 16)),
     r"stitch_layers\.2\.0\.1\.transform\.weight: shape mismatch: checkpoint \[32, 16\] vs expected \[32, 32\]"),
    ("swin", _drop("stitch_layers.2.1.4.transform.bias"), r"missing tensor stitch_layers\.2\.1\.4\.transform\.bias"),
    ("swin", _set("stitch_layers.2.0.2.transform.weight", torch.zeros(1)), r"unexpected tensor stitch_layers\.2\.0\.2\."),
    ("swin", _set("stitch_layers.3.0.0.transform.weight", torch.zeros(1)), r"unexpected tensor stitch_layers\.3\."),
    ("swin", _set("optimizer.lr", torch.zeros(1)), r"unexpected tensor optimizer\.lr"),
    ("resnet", _set("stitch_layers.0.0.1.transform.weight", torch.zeros(64, 16)),
     r"stitch_layers\.0\.0\.1\.transform\.weight: shape mismatch: checkpoint \[64, 16\] vs expected \[64, 16, 1, 1\]"),
    ("levit", _set("anchors.1.blocks.2.m.attention_bias_idxs", torch.zeros(64, 64, dtype=torch.long)),
     r"anchors\.1\.blocks\.2\.m\.attention_bias_idxs: differs"),
    ("levit", _drop("anchors.0.blocks.11.m.0.c.weight"), r"anchors\.0: blocks\.10 is not followed by an MLP residual"),
    ("levit", _set("anchors.1.blocks.12.m.qkv.c.weight", torch.zeros(3, 3)), r"anchors\.1\.blocks\.12\.m\.qkv\.c\.weight: shape mismatch"),
]


@functools.cache
def _tiny_state(kind):
    return FAMILIES[kind][4]()[0]


@pytest.mark.parametrize("kind,corrupt,message", BAD)
def test_bad_input_is_one_clear_line(kind, corrupt, message):
    state = dict(_tiny_state(kind))
    corrupt(state)
    with pytest.raises(StitchError, match=message) as info:
        build_network(state)
    assert "\n" not in str(info.value)


def test_unordered_anchors_and_file_errors_name_the_path(tmp_path):
    state = _tiny_state("swin")
    swapped = {k.replace("anchors.0.", "anchors.x.").replace("anchors.1.", "anchors.0.").replace("anchors.x.", "anchors.1."): v
               for k, v in state.items()}
    save_swin(tmp_path / "bad.pth", swapped)
    with pytest.raises(StitchError, match=r"bad\.pth: .*ordered from shallow to deep.*stage 2 has depths \[6, 2, 6\]"):
        sc.load(str(tmp_path / "bad.pth"))


# ---- 6. segments export with a dynamic batch ----------------------------------------------------------

def _onnx_roundtrip(segment):
    module = segment.module
    for m in module.modules():
        if getattr(m, "fused_attn", False):
            m.fused_attn = False
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, *segment.in_shape),), buf, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, *segment.in_shape)
        with torch.no_grad():
            ref = module(x).numpy()
        y = session.run(None, {"x": x.numpy()})[0]
        assert y.shape == ref.shape and np.abs(y - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), segment.key


EXPORTED = {
    "swin": ["stem:0", "down:2:1", "block:0:0.1", "block:1:3.1", "stitch:2:0:0", "head:2"],
    "resnet": ["stem:0", "block:1:1.0", "block:0:2.1", "stitch:1:0:0", "head:1"],
    "resnet_swin": ["stitch:2:0:1"],
    "levit": ["stem:0", "down:1:2", "block:0:0.3", "stitch:1:0:2", "head:1"],
}


def test_one_segment_of_each_kind_exports_with_a_dynamic_batch(tiny):
    kind, *_, net = tiny
    for key in EXPORTED[kind]:
        _onnx_roundtrip(net.segments[key])


ROUTES = {
    "swin": (9, "A0.s0[0-1] > A0.s1[0-1] > A0.s2[0-1] > L2.0.0 > A1.s2[3-5] > A1.s3[0-1] > H1"),
    "resnet": (3, "A0.s0[0-1] > A0.s1[0-1] > L1.0.0 > A1.s1[2-3] > A1.s2[0-5] > A1.s3[0-2] > H1"),
    "resnet_swin": (2, "A0.s0[0-1] > A0.s1[0-0] > L1.0.0 > A1.s1[1-1] > A1.s2[0-5] > A1.s3[0-1] > H1"),
    "levit": (6, "A0.s0[0-3] > A0.s1[0-1] > L1.0.1 > A1.s1[2-3] > A1.s2[0-3] > H1"),
}


def test_describe_route_collapses_blocks_per_stage(tiny):
    kind, *_, net = tiny
    cid, text = ROUTES[kind]
    assert describe_route(net.configs[cid].route) == text


# ---- export, runtime and bench flow through unchanged ----------------------------------------------

def test_export_runtime_and_bench_work_for_every_family(tiny, tmp_path):
    from stitch_compile.bench import bench
    from stitch_compile.export import export
    from stitch_compile.runtime import Runtime

    kind, _, _, _, net = tiny
    stitched = {c.extra.get("stage_id"): c.id for c in net.configs if not c.is_anchor}  # one per stitched stage
    ids = sorted({c.id for c in net.configs if c.is_anchor} | set(stitched.values()))
    bundle = export(net, str(tmp_path / "bundle"), targets="onnx", configs=ids)  # parity-checked inside
    runtime = Runtime(bundle, threads=1)
    x = torch.randn(3, *net.input_shape)
    for cid in ids:
        with torch.no_grad():
            ref = net(x, cid).numpy()
        got = runtime.run(x.numpy(), cid)
        assert abs(got - ref).max() <= 1e-4 * abs(ref).max(), (kind, cid)
    lut = bench(runtime, batches=(1, 2), runs=2, warmup=1)
    assert {int(c) for c in lut.data["latency"]["2"]} == set(ids)
