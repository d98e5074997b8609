"""LS init of stitching layers, ``stitch()``, ``save_checkpoint``, the ``stitch`` command, the demo training."""

from __future__ import annotations

import argparse
import os
import statistics

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from timm.models.vision_transformer import VisionTransformer

import stitch_compile
from stitch_compile import StitchError, save_checkpoint, stitch
from stitch_compile.demo import evaluate, train_demo
from stitch_compile.model.families.snnet_v1 import stitch_positions
from stitch_compile.model.lsinit import read_calibration_images, solve_affine
from stitch_compile.model.space import pareto_frontier

WIDTHS = (64, 128, 192)
DEPTH = 3  # 7 positions on 2 stitching layers per pair: 3 + 2 x 7 = 17 configs
TINY_NAME = "vit_tiny_patch16_224:patch_size=8:depth=3:num_classes=10:embed_dim={w}:num_heads={h}"


def tiny_vit(width: int, depth: int = DEPTH, seed: int = 0, **kw) -> VisionTransformer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + width)
        return VisionTransformer(**{"img_size": 16, "patch_size": 8, "num_classes": 10, "embed_dim": width,
                                    "depth": depth, "num_heads": max(1, width // 64), **kw}).eval()


@pytest.fixture(scope="module")
def anchors():
    return [tiny_vit(w) for w in WIDTHS]


@pytest.fixture(scope="module")
def calib():
    """32 images x 5 tokens: more rows than the 128 + 1 unknowns of the widest front anchor."""
    return torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def stitched(anchors, calib):
    return stitch(anchors, calib)


# ---- the solver and the averaging ------------------------------------------------------------

def test_solver_recovers_an_affine_map():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 50, 24, generator=gen, dtype=torch.float64)  # (images, tokens, C): flattened inside
    m, c = torch.randn(24, 40, generator=gen, dtype=torch.float64), torch.randn(40, generator=gen, dtype=torch.float64)
    weight, bias = solve_affine(x, x @ m + c)
    assert weight.shape == (40, 24) and bias.shape == (40,)
    torch.testing.assert_close(weight, m.T, rtol=0, atol=1e-9)
    torch.testing.assert_close(bias, c, rtol=0, atol=1e-9)


def test_solver_ignores_a_constant_input_direction():
    """A zero-variance input channel is absorbed by the bias, not blown up (pinv truncation)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(400, 6, generator=gen, dtype=torch.float64)
    x[:, 2] = 3.0
    y = x[:, :2] * 2 + 1
    weight, bias = solve_affine(x, y)
    assert weight.abs().max() < 10
    torch.testing.assert_close(x @ weight.T + bias, y, rtol=0, atol=1e-9)


def _hooked_features(vit, images):
    """Block inputs seen by forward hooks on timm's own modules: [stem, block 0, ..., last block]."""
    seen = []
    handles = [vit.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))]
    handles += [b.register_forward_hook(lambda _m, _i, out: seen.append(out)) for b in vit.blocks]
    with torch.no_grad():
        vit(images)
    for h in handles:
        h.remove()
    return seen


def test_layers_average_the_positions_sharing_them(anchors, calib, stitched):
    """X = A's block j output, Y = B's block k-1 output (stem for k = 0), averaged per layer."""
    features = [_hooked_features(v, calib) for v in anchors]
    positions, layer_of, n_layers = stitch_positions(DEPTH)
    state = stitched.state_dict()
    for p in range(len(anchors) - 1):
        for layer in range(n_layers):
            solved = [solve_affine(features[p][j + 1], features[p + 1][k])
                      for (j, k), l in zip(positions, layer_of) if l == layer]
            assert len(solved) >= 3
            weight = torch.stack([w for w, _ in solved]).mean(0)
            bias = torch.stack([b for _, b in solved]).mean(0)
            key = f"stitch_layers.{p}.{layer}.transform."
            torch.testing.assert_close(state[key + "weight"], weight.float(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(state[key + "bias"], bias.float(), rtol=1e-4, atol=1e-5)


# ---- stitch(), save_checkpoint, load --------------------------------------------------------

def test_stitch_builds_the_v1_layout(stitched, anchors, calib):
    assert stitched.family == "snnet_v1_vit"
    assert len(stitched.configs) == 3 + 2 * 7
    with torch.no_grad():
        for a, vit in enumerate(anchors):
            torch.testing.assert_close(stitched(calib, a), vit(calib))


def test_stitch_leaves_the_callers_anchors_in_their_mode(calib):
    vits = [tiny_vit(w).train() for w in WIDTHS[:2]]
    stitch(vits, calib)
    assert all(v.training for v in vits)


def test_saved_checkpoint_reloads_identically(stitched, calib, tmp_path):
    path = tmp_path / "snnet.pth"
    save_checkpoint(stitched, str(path), args=argparse.Namespace(model="snnet"))
    with torch.serialization.safe_globals([argparse.Namespace]):
        container = torch.load(path, weights_only=True)
    assert set(container) == {"model", "optimizer", "epoch", "args"} and container["args"].model == "snnet"
    assert sorted(container["model"]) == sorted(stitched.state_dict())
    loaded = stitch_compile.load(str(path))
    assert [c.to_json() for c in loaded.configs] == [c.to_json() for c in stitched.configs]
    with torch.no_grad():
        for config in stitched.configs:
            assert torch.equal(loaded(calib, config.id), stitched(calib, config.id)), config.id
    assert [p.name for p in tmp_path.iterdir()] == ["snnet.pth"]
    (tmp_path / "latest.pth").symlink_to(path)  # a link kept to the newest checkpoint stays a link
    save_checkpoint(stitched, str(tmp_path / "latest.pth"), args=argparse.Namespace(model="again"))
    assert (tmp_path / "latest.pth").is_symlink() and torch.load(path, weights_only=False)["args"].model == "again"


def test_failed_save_keeps_the_old_file(stitched, tmp_path, monkeypatch):
    path = tmp_path / "snnet.pth"
    path.write_bytes(b"old")

    def broken(*_a, **_k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(StitchError, match=r"snnet\.pth: cannot write the checkpoint \(disk full\)"):
        save_checkpoint(stitched, str(path))
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["snnet.pth"]


@pytest.mark.parametrize("kwargs, match", [
    ({"global_pool": "avg"}, "not DeiT-like"),  # avg pooling: timm drops `norm` for `fc_norm`
    ({"num_heads": 4}, "rebuilds a different network"),  # same tensors, 4 heads where detection assumes 2
])
def test_anchors_the_layout_cannot_describe_need_their_names(kwargs, match, calib, tmp_path):
    vits = [tiny_vit(w, **kwargs) for w in (64, 128)]
    with pytest.raises(StitchError, match=match + ".*timm names"):
        stitch(vits, calib)
    names = [TINY_NAME.format(w=w, h=kwargs.get("num_heads", w // 64)) + ":img_size=16"
             + "".join(f":{k}={v}" for k, v in kwargs.items() if k != "num_heads") for w in (64, 128)]
    net = stitch(vits, calib, names)
    save_checkpoint(net, str(tmp_path / "named.pth"))
    loaded = stitch_compile.load(str(tmp_path / "named.pth"), anchors=names)
    with torch.no_grad():
        assert all(torch.equal(loaded(calib, c.id), net(calib, c.id)) for c in net.configs)


@pytest.mark.parametrize("make, match", [
    (lambda: [tiny_vit(64)], "at least 2 anchors"),
    (lambda: [tiny_vit(64), tiny_vit(128, depth=2)], "equal depth"),
    (lambda: [tiny_vit(128), tiny_vit(64)], "increasing width"),
    (lambda: [tiny_vit(64), torch.nn.Linear(3, 3)], "not a timm VisionTransformer"),
    (lambda: [tiny_vit(64), VisionTransformer(img_size=32, patch_size=16, embed_dim=128, depth=DEPTH, num_heads=2,
                                              num_classes=10)], "takes images"),
])
def test_stitch_rejects_bad_anchors(make, match, calib):
    with pytest.raises(StitchError, match=match):
        stitch(make(), calib)


@pytest.mark.parametrize("images, match", [
    (torch.zeros(4, 3, 16, 16, dtype=torch.uint8), r"non-empty float32 tensor \[N, C, H, W\]"),
    (torch.zeros(0, 3, 16, 16), r"non-empty float32 tensor"),
    (np.zeros((4, 3, 16, 16), np.float32), r"non-empty float32 tensor"),
    (torch.full((4, 3, 16, 16), float("nan")), "hold NaN or Inf"),
], ids=["uint8", "empty", "numpy", "nan"])
def test_stitch_rejects_bad_images(anchors, images, match):
    with pytest.raises(StitchError, match=match):
        stitch(anchors, images)


def test_stitch_rejects_anchors_with_other_heads(calib):
    with pytest.raises(StitchError, match=r"\[7, 10\] classes"):
        stitch([tiny_vit(64), tiny_vit(128, num_classes=7)], calib)


# ---- the stitch command ----------------------------------------------------------------------

def _write_images(folder, count=10):
    """Class sub-folders, odd sizes, grey and RGB: all must come out [3, 16, 16]."""
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / f"class{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        if i % 2:
            Image.fromarray(rng.integers(0, 255, (20 + i, 31, 3), dtype=np.uint8)).save(sub / f"{i}.png")
        else:
            Image.fromarray(rng.integers(0, 255, (17, 16 + i), dtype=np.uint8), mode="L").save(sub / f"{i}.jpg")
    (folder / "notes.txt").write_text("not an image")


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, anchors):
    """The anchors as timm checkpoints: a bare state dict, under 'model', under 'state_dict'."""
    root = tmp_path_factory.mktemp("stitch_cli")
    paths = []
    for a, (vit, wrap) in enumerate(zip(anchors, (lambda s: s, lambda s: {"model": s}, lambda s: {"state_dict": s}))):
        paths.append(root / f"anchor{a}.pth")
        torch.save(wrap(vit.state_dict()), paths[-1])
    _write_images(root / "calib")
    return root, paths


def test_read_calibration_images(cli_files):
    root, _ = cli_files
    images = read_calibration_images(str(root / "calib"), (16, 16), count=6)
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.float32
    assert torch.equal(images, read_calibration_images(str(root / "calib"), (16, 16), count=6))
    assert -2.2 < images.min() < images.max() < 2.7  # ImageNet-normalised [0, 1] pixels


def test_cli_stitch_end_to_end(cli, cli_files, anchors, tmp_path):
    root, paths = cli_files
    out = tmp_path / "snnet.pth"
    code, stdout, stderr = cli("stitch", *paths, "--calib", root / "calib", "--out", out, "--calib-count", 8, "--quiet")
    assert (code, stderr) == (0, "")
    assert stdout.count("\n") == 1 and "17 configs from 3 anchors" in stdout and "4 stitching layers" in stdout
    images = read_calibration_images(str(root / "calib"), (16, 16), count=8)
    expected = stitch(anchors, images).state_dict()
    loaded = stitch_compile.load(str(out))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())


def test_cli_stitch_with_timm_names(cli, cli_files, tmp_path):
    root, paths = cli_files
    names = ",".join(TINY_NAME.format(w=w, h=w // 64) for w in WIDTHS)
    code, _, stderr = cli("stitch", *paths, "--anchors", names, "--img-size", 16, "--calib", root / "calib",
                          "--out", tmp_path / "named.pth", "--calib-count", 8)
    assert code == 0 and "least-squares initialisation on 8 images" in stderr
    code, _, _ = cli("stitch", *paths, "--calib", root / "calib", "--out", tmp_path / "detected.pth",
                     "--calib-count", 8)
    named, detected = (stitch_compile.load(str(tmp_path / f)) for f in ("named.pth", "detected.pth"))
    assert code == 0 and all(torch.equal(v, detected.state_dict()[k]) for k, v in named.state_dict().items())


def _cli_error_cases(root, paths, tmp):
    garbage = tmp / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    not_vit = tmp / "linear.pth"
    torch.save(torch.nn.Linear(3, 3).state_dict(), not_vit)
    shallow = tmp / "shallow.pth"
    torch.save(tiny_vit(256, depth=2).state_dict(), shallow)
    empty = tmp / "empty"
    empty.mkdir()
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"\x89PNG truncated")
    piped = tmp / "piped"
    piped.mkdir()
    os.mkfifo(piped / "x.png")  # reading it would block forever
    headless = tmp / "headless.pth"
    torch.save(tiny_vit(256, num_classes=0).state_dict(), headless)
    calib = ["--calib", root / "calib"]
    return {
        "missing file": ([tmp / "nope.pth", *paths[1:], *calib], "no such file"),
        "not a checkpoint": ([garbage, *paths[1:], *calib], "not a torch checkpoint"),
        "not a ViT": ([not_vit, *paths[1:], *calib], "not a ViT anchor"),
        "one anchor": ([paths[0], *calib], "at least 2 anchor checkpoints"),
        "depth mismatch": ([*paths, shallow, *calib], "equal depth"),
        "width order": ([paths[1], paths[0], *calib], "increasing width"),
        "names count": ([*paths, "--anchors", "a,b", *calib], "2 names for 3 anchor checkpoints"),
        "img size alone": ([*paths, "--img-size", 16, *calib], "--img-size needs --anchors"),
        "no calib folder": ([*paths, "--calib", tmp / "nowhere"], "not a folder"),
        "no images": ([*paths, "--calib", empty], "no images found"),
        "bad image": ([*paths, "--calib", broken], "not a readable image"),
        "out folder": ([*paths, *calib, "--out", tmp / "missing" / "x.pth"], "folder does not exist"),
        "out is an anchor": ([*paths, *calib, "--out", paths[1]], "is one of the anchor checkpoints"),
        "out is a pipe": ([*paths, *calib, "--out", piped / "x.png"], "not a regular file"),
        "image is a pipe": ([*paths, "--calib", piped], "not a regular file"),
        "no head": ([*paths, headless, *calib], "[0, 10] classes (0: no head)"),
        "timm kwarg error": ([*paths, "--anchors", ",".join(["vit_tiny_patch16_224:act_layer=xyz"] * 3), *calib],
                             "KeyError"),
        "timm loads files": ([*paths, "--anchors", ",".join(["vit_tiny_patch16_224:checkpoint_path=/etc/hosts"] * 3),
                              *calib], "checkpoint_path is not allowed"),
    }


def test_cli_stitch_errors_are_one_line_and_keep_out(cli, cli_files, tmp_path):
    root, paths = cli_files
    out = tmp_path / "snnet.pth"
    out.write_bytes(b"previous")
    anchor_bytes = [p.read_bytes() for p in paths]
    for case, (args, match) in _cli_error_cases(root, paths, tmp_path).items():
        if "--out" not in args:
            args = [*args, "--out", out]
        code, stdout, stderr = cli("stitch", *args, "--quiet")
        assert code == 2, case
        assert stdout == "" and stderr.count("\n") == 1, (case, stderr)
        assert stderr.startswith("error: ") and match in stderr, (case, stderr)
        assert out.read_bytes() == b"previous", case
    assert [p.read_bytes() for p in paths] == anchor_bytes


# ---- the demo training -----------------------------------------------------------------------

def _effect(run):
    acc = run.test_accuracy()
    anchors = [acc[i] for i in range(len(run.net.anchors))]
    stitched = [acc[c.id] for c in run.net.configs if not c.is_anchor]
    frontier = pareto_frontier({c.id: (c.flops, acc[c.id]) for c in run.net.configs})
    return anchors, stitched, [i for i in frontier if not run.net.configs[i].is_anchor]


def _share_between(values, low, high):
    return sum(low <= v <= high for v in values) / len(values)


@pytest.fixture(scope="module")
def fast_run():
    return train_demo(fast=True)


def test_fast_demo_shows_the_snnet_effect(fast_run):
    """Wider anchors are better; stitched configs mostly land between them and reach the frontier."""
    anchors, stitched, on_frontier = _effect(fast_run)
    assert len(fast_run.net.configs) == 3 + 2 * 10
    assert min(anchors) > 0.8 and anchors[-1] > anchors[0]
    assert _share_between(stitched, min(anchors) - 0.03, max(anchors) + 0.01) >= 0.75
    assert statistics.median(stitched) > min(anchors) - 0.03
    assert on_frontier


def test_cli_stitches_the_demo_anchors_from_files(fast_run, cli, tmp_path):
    """The quick start by hand: trained anchors as timm files, digits as PNGs; LS init alone already
    gives usable stitched configs (no stitched training)."""
    paths = []
    for a, vit in enumerate(fast_run.anchors):
        paths.append(tmp_path / f"anchor{a}.pth")
        torch.save({"model": vit.state_dict()}, paths[-1])
    raw = load_digits()
    for i, (pixels, label) in enumerate(zip(raw.images[:300], raw.target[:300])):
        (tmp_path / "digits" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.uint8(pixels * 255 / 16)).save(tmp_path / "digits" / str(label) / f"{i}.png")
    code, out, _ = cli("stitch", *paths, "--calib", tmp_path / "digits", "--calib-count", 256,
                       "--out", tmp_path / "snnet.pth", "--quiet")
    assert code == 0 and "23 configs" in out
    net = stitch_compile.load(str(tmp_path / "snnet.pth"))
    x = fast_run.data.test_x
    with torch.no_grad():
        assert all(torch.equal(net(x, a), vit(x)) for a, vit in enumerate(fast_run.anchors))
    acc = evaluate(net, x, fast_run.data.test_y)
    assert statistics.median(acc[c.id] for c in net.configs if not c.is_anchor) > 0.6


@pytest.mark.slow
def test_demo_shows_the_snnet_effect():
    run = train_demo()
    anchors, stitched, on_frontier = _effect(run)
    assert len(run.net.configs) == 3 + 2 * 16
    assert anchors == sorted(anchors) and min(anchors) > 0.88
    assert _share_between(stitched, min(anchors) - 0.01, max(anchors) + 0.01) >= 0.8
    assert len(on_frontier) >= 3
