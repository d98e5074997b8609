"""Bad input through the real CLI: exit 2, one 'error:' line on stderr, nothing on disk changed."""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import shutil
import subprocess

import pytest
import torch

from stitch_compile.errors import StitchError
from stitch_compile.cli import main
from snnet_reference import save_public



class Payload:
    """Unpickling this runs ``touch marker``: a checkpoint that would execute code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _snapshot(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in folder.rglob("*")}


def refused(cli, path, *options, match):
    """Run ``inspect path``; check the one-line refusal and that the folder is untouched."""
    before = _snapshot(path.parent)
    code, out, err = cli("inspect", path, *options)
    assert (code, out) == (2, ""), err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert re.search(match, err), err
    assert _snapshot(path.parent) == before
    return err


@pytest.fixture
def good(tmp_path, small_v1_state):
    """A valid checkpoint in the public container."""
    path = tmp_path / "good.pth"
    save_public(path, small_v1_state)
    return path


def test_missing_file(cli, tmp_path):
    refused(cli, tmp_path / "nope.pth", match=r"nope\.pth.*(no such file|does not exist)")


def test_folder(cli, tmp_path):
    (tmp_path / "ckpt.pth").mkdir()
    refused(cli, tmp_path / "ckpt.pth", match=r"ckpt\.pth.*(is a directory|is a folder)")


@pytest.mark.parametrize("content", [random.Random(0).randbytes(4096), b"hello, not a checkpoint\n", b"[1, 2]\n"],
                         ids=["random-bytes", "text", "short-text"])
def test_not_a_torch_file(cli, tmp_path, content):
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    refused(cli, path, match=r"x\.pth: not a torch checkpoint")


@pytest.mark.parametrize("keep", [64, 0.5, -22], ids=["head", "half", "no-central-directory"])
def test_truncated(cli, good, keep):
    data = good.read_bytes()
    path = good.parent / "cut.pth"
    path.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    refused(cli, path, match=r"cut\.pth: truncated or corrupt")


@pytest.mark.parametrize("obj, match", [
    ({"conv1.weight": torch.zeros(2), "fc.bias": torch.zeros(2)},
     r"unknown checkpoint layout: expected SN-Net keys 'anchors\.<i>\..*'stitch_layers\.<pair>"),
    ({"epoch": 3, "net": "resnet"}, r"unknown checkpoint layout: .*'model', 'state_dict', 'state_dict_ema'.*found keys: epoch, net"),
    ([torch.zeros(2)], r"unknown checkpoint layout: expected a dict, found list"),
], ids=["foreign-tensors", "no-state-dict", "list"])
def test_unknown_layout(cli, tmp_path, obj, match):
    path = tmp_path / "other.pth"
    torch.save(obj, path)
    refused(cli, path, match=match)


def _drop(key):
    return lambda s: s.pop(key)


def _add(key, shape):
    return lambda s: s.__setitem__(key, torch.zeros(shape))


@pytest.mark.parametrize("edit, match", [
    (_drop("anchors.1.blocks.1.attn.qkv.bias"), r"missing tensor anchors\.1\.blocks\.1\.attn\.qkv\.bias"),
    (_drop("anchors.0.cls_token"), r"missing tensor anchors\.0\.cls_token"),
    (_drop("stitch_layers.1.0.transform.bias"), r"missing tensor stitch_layers\.1\.0\.transform\.bias"),
    (_add("anchors.2.blocks.0.attn.extra", (3,)), r"unexpected tensor anchors\.2\.blocks\.0\.attn\.extra"),
    (_add("stitch_layers.0.1.transform.weight", (128, 64)), r"unexpected tensor stitch_layers\.0\.1\."),
    (_add("teacher.head.weight", (10, 192)), r"unexpected tensor teacher\.head\.weight"),
    (_add("anchors.1.blocks.1.mlp.fc2.weight", (128, 500)),
     r"anchors\.1\.blocks\.1\.mlp\.fc2\.weight: shape mismatch: checkpoint \[128, 500\] vs anchor \[128, 512\]"),
    (_add("stitch_layers.0.0.transform.weight", (128, 65)),
     r"stitch_layers\.0\.0\.transform\.weight: shape mismatch: checkpoint \[128, 65\] vs expected \[128, 64\]"),
], ids=["missing-block-tensor", "missing-cls-token", "missing-stitch-bias", "unexpected-in-anchor",
        "unexpected-stitch-layer", "unexpected-top-level", "shape-anchor", "shape-stitch"])
def test_wrong_tensors(cli, tmp_path, small_v1_state, edit, match):
    state = dict(small_v1_state)
    edit(state)
    path = tmp_path / "edited.pth"
    save_public(path, state)
    refused(cli, path, match=r"edited\.pth: .*" + match)


def _set(key, make):
    return lambda s: s.__setitem__(key, make(s[key]))


def _poke(key, value):
    def edit(s):
        s[key] = s[key].clone()
        s[key].view(-1)[0] = value
    return edit


QKV = "anchors.0.blocks.0.attn.qkv.weight"


@pytest.mark.parametrize("edit, match", [
    (_poke(QKV, float("nan")), rf"tensor {QKV} is holding NaN or Inf: .*training diverged"),
    (_poke(QKV, float("-inf")), rf"tensor {QKV} is holding NaN or Inf"),
    (_set(QKV, lambda t: t > 0), rf"tensor {QKV} is of dtype torch\.bool"),
    (_set(QKV, lambda t: t.to(torch.complex64)), rf"tensor {QKV} is of dtype torch\.complex64"),
    (_set(QKV, lambda t: t.to_sparse()), rf"tensor {QKV} is a torch\.sparse_coo tensor"),
    (_set(QKV, lambda t: t.to("meta")), rf"tensor {QKV} is a meta tensor"),
    (_set(QKV, lambda t: t[:0]), rf"tensor {QKV} is empty \(shape \[0, 64\]\)"),
    (_set(QKV, lambda t: t.round().long()), rf"{QKV}: dtype mismatch: checkpoint torch\.int64 vs anchor torch\.float32"),
    (_set("stitch_layers.0.0.transform.weight", lambda t: t.round().int()),
     r"stitch_layers\.0\.0\.transform\.weight: dtype torch\.int32; a stitching layer's weights are floating point"),
    (_set("anchors.0.patch_embed.proj.weight", lambda t: t[0, 0]),
     r"tensors of impossible shapes for a snnet_v1_vit checkpoint \(IndexError"),
    (_set("anchors.0.patch_embed.proj.weight", lambda t: torch.cat([t, t[:, :2]], dim=1)),
     r"anchors take different inputs \[\[3, 32, 32\], \[5, 32, 32\]\]"),
    (lambda s: s.update({"anchors.1.head.weight": s["anchors.1.head.weight"][:7], "anchors.1.head.bias": s["anchors.1.head.bias"][:7]}),
     r"classifier heads have \[7, 10\] classes"),
    (lambda s: [s.pop(f"anchors.2.head.{p}") for p in ("weight", "bias")], r"classifier heads have \[0, 10\] classes \(0: no head\)"),
], ids=["nan", "inf", "bool", "complex", "sparse", "meta", "empty", "int-in-anchor", "int-in-stitch-layer",
        "rank-of-a-detected-tensor", "input-channels-differ", "classes-differ", "no-head"])
def test_impossible_tensors(cli, tmp_path, small_v1_state, edit, match):
    """What loading would copy silently, or fail on with a traceback, is one line naming the tensor."""
    state = dict(small_v1_state)
    edit(state)
    path = tmp_path / "edited.pth"
    torch.save({"model": state}, path)  # as it is: save_public would make it contiguous and dense
    refused(cli, path, match=r"edited\.pth: .*" + match)


def test_integer_keys(cli, tmp_path, small_v1_state):
    path = tmp_path / "ints.pth"
    torch.save({"model": dict(enumerate(small_v1_state.values()))}, path)
    refused(cli, path, match=r"ints\.pth: unknown checkpoint layout")


def test_a_pipe_is_not_read(cli, tmp_path):
    """Reading a FIFO nobody writes to would block forever."""
    path = tmp_path / "pipe.pth"
    os.mkfifo(path)
    refused(cli, path, match=r"pipe\.pth: not a regular file")


def _pickles(marker):
    """The payload saved by torch.save (zip and legacy formats) and as a raw pickle (protocols 2, 4)."""
    obj = {"model": Payload(marker)}
    yield "torch-zip", lambda p: torch.save(obj, p)
    yield "torch-legacy", lambda p: torch.save(obj, p, _use_new_zipfile_serialization=False)
    for proto in (2, 4):
        yield f"pickle-{proto}", lambda p, proto=proto: p.write_bytes(pickle.dumps(obj, protocol=proto))


def test_malicious_pickles_are_refused(cli, tmp_path):
    marker = tmp_path / "pwned"
    for name, write in _pickles(marker):
        path = tmp_path / f"{name}.pth"
        write(path)
        err = refused(cli, path, match=rf"{name}\.pth: (refused to unpickle|not a torch checkpoint)")
        if name != "pickle-4":  # protocol 4 fails on its framing opcode before reaching the global
            assert "refused to unpickle" in err and "system" in err
        assert not marker.exists(), name


def test_malicious_pickle_console_script(tmp_path):
    """The installed ``stitch-compile`` itself: exit 2, one stderr line, the payload never ran."""
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"model": Payload(marker)}, protocol=4))
    exe = shutil.which("stitch-compile")
    assert exe, "stitch-compile is not installed (pip install -e .)"
    proc = subprocess.run([exe, "inspect", str(path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("anchors, match", [
    ("no_such_model,b,c", r"--anchors: unknown timm model 'no_such_model'"),
    ("deit_tiny_patch16_224", r"--anchors: 1 names given but the checkpoint holds 3 anchors"),
    (",".join(["deit_tiny_patch16_224:depth=2:img_size=32:patch_size=8:num_classes=10"] * 3),
     r"anchors\.0\.cls_token: shape mismatch: checkpoint \[1, 1, 64\] vs anchor \[1, 1, 192\]"),
    ("resnet18,resnet18,resnet18", r"--anchors 'resnet18': not a ViT"),
    ("deit_tiny_patch16_224:foo=1,b,c", r"--anchors 'deit_tiny_patch16_224:foo=1': .*unexpected keyword argument 'foo'"),
    ("deit_tiny_patch16_224:img_size,b,c", r"--anchors .*expected key=value"),
    ("deit_tiny_patch16_224:embed_dim=65,b,c", r"--anchors 'deit_tiny_patch16_224:embed_dim=65': .*divisible"),
    ("deit_tiny_patch16_224:patch_size=0,b,c", r"--anchors 'deit_tiny_patch16_224:patch_size=0': "),
], ids=["unknown", "count", "shapes", "not-vit", "bad-kwarg", "no-value", "heads-dont-divide", "zero-patch"])
def test_bad_anchors_cli(cli, good, anchors, match):
    refused(cli, good, "--anchors", anchors, match=r"good\.pth: " + match)


@pytest.mark.parametrize("where", ["before", "after"])  # before or after the command, as users type it
def test_debug_keeps_the_exception(tmp_path, where):
    args = ["inspect", str(tmp_path / "nope.pth")]
    with pytest.raises(StitchError, match="no such file"):
        main(["--debug", *args] if where == "before" else [*args, "--debug"])


def _save_with_fake_yacs(path, extra=None):
    """torch.save a Swin-style container whose 'config' is a yacs CfgNode (yacs is not installed)."""
    import sys
    import types

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    package, module = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    module.CfgNode = CfgNode
    sys.modules.update({"yacs": package, "yacs.config": module})
    try:
        config = CfgNode({"MODEL": CfgNode({"TYPE": "snnet"}), "DATA": CfgNode({"IMG_SIZE": 224})})
        torch.save({"model": {"anchors.0.w": torch.ones(3)}, "config": config, "max_accuracy": 80.1, **(extra or {})}, path)
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]


def test_swin_container_with_yacs_config_loads_as_data(tmp_path):
    from stitch_compile.model.checkpoint import read_state_dict

    path = tmp_path / "swin.pth"
    _save_with_fake_yacs(path)
    state, container = read_state_dict(str(path))
    assert container == "model" and torch.equal(state["anchors.0.w"], torch.ones(3))


def test_yacs_container_still_refuses_code(tmp_path, cli):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil_swin.pth"
    _save_with_fake_yacs(path, {"payload": Payload()})
    code, out, err = cli("inspect", path)
    assert code == 2 and err.count("\n") == 1 and "refused to unpickle" in err
    assert not marker.exists()
