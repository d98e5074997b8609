"""Target tensorrt: build.sh, TensorRT's ONNX operator set, fp16 graphs; engines where a GPU has TensorRT.

Everything but the engines themselves runs on any machine: the script is executed for real with
DRY_RUN=1 (GPU_NAME and TRT_VERSION given, so neither nvidia-smi nor trtexec is needed), and the
fp16 graphs are checked in ONNX Runtime. The tests at the end need the tensorrt package and a
CUDA GPU and skip, saying so, elsewhere; nothing stands in for TensorRT.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, shape_inference

import stitch_compile as sc
from cli_runner import run_cli
from stitch_compile.errors import StitchError
from stitch_compile.export import export
from stitch_compile.export.parity import REL_TOL
from stitch_compile.export.targets import unavailable_reason
from stitch_compile.export.tensorrt_ops import check_graphs, parser_support, unsupported
from stitch_compile.export.tensorrt_script import engine_key
from stitch_compile.export.weights import ALIGN
from stitch_compile.ortweights import SharedWeights
from staged_reference import levit_pair, resnet_pair, resnet_swin, save_deit, save_swin, save_timm, swin_tsb

CONFIGS = [0, 8, 52]  # an anchor and a stitched config of each anchor pair
MAX_BATCH = 4
TRT_HERE = unavailable_reason("tensorrt") is None
NO_TRT = pytest.mark.skipif(TRT_HERE, reason="TensorRT and a GPU are here, so export builds the engines")


def _export(net, out, **options):
    lines = []
    bundle = export(net, str(out), targets="tensorrt", configs=CONFIGS, max_batch=MAX_BATCH,
                    report=lines.append, **options)
    return bundle, lines


@pytest.fixture(scope="module")
def fp32(v1_net, tmp_path_factory):
    return _export(v1_net, tmp_path_factory.mktemp("trt") / "fp32")


@pytest.fixture(scope="module")
def fp16(v1_net, tmp_path_factory):
    return _export(v1_net, tmp_path_factory.mktemp("trt") / "fp16", precision="fp16")


def commands(bundle) -> list[dict]:
    """The trtexec commands of build.sh as {flag: value} ("" for bare flags), in order."""
    with open(bundle.path("tensorrt/build.sh"), encoding="utf-8") as f:
        lines = [line for line in f if '"$TRTEXEC" --onnx=' in line]
    return [{k: v for k, _, v in (t.partition("=") for t in shlex.split(line)[2:])} for line in lines]


def dry_run(bundle, gpu: str, version: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY_RUN": "1", "GPU_NAME": gpu, "TRT_VERSION": version}
    return subprocess.run(["sh", bundle.path("tensorrt/build.sh")], env=env, capture_output=True, text=True)


# ---- build.sh ------------------------------------------------------------------------------------

def test_build_script_builds_every_config_from_the_bundle_graphs(fp32):
    bundle, _ = fp32
    entry = bundle.manifest["targets"]["tensorrt"]
    cmds = commands(bundle)
    assert [c["--onnx"] for c in cmds] == [entry["graphs"][str(i)] for i in CONFIGS]
    assert entry["graphs"] == bundle.manifest["targets"]["onnx"]["graphs"]  # fp32 engines read the onnx graphs
    for cid, c in zip(CONFIGS, cmds):
        assert c["--onnx"] in bundle.manifest["files"] and os.path.isfile(bundle.path(c["--onnx"]))
        assert c["--saveEngine"] == f"tensorrt/$DEVICE_KEY/config_{cid}.plan"
        assert c["--minShapes"] == "image:1x3x32x32" and c["--optShapes"] == "image:1x3x32x32"
        assert c["--maxShapes"] == f"image:{MAX_BATCH}x3x32x32"
        assert {"--stripWeights", "--skipInference", "--noTF32"} <= set(c)
        assert not {"--refit", "--fp16", "--stronglyTyped"} & set(c)  # --refit would mean REFIT, not REFIT_IDENTICAL
    assert {c["--timingCacheFile"] for c in cmds} == {"tensorrt/$DEVICE_KEY/timing.cache"}  # one cache for all


def test_build_script_is_an_executable_hashed_file_that_explains_itself(fp32):
    bundle, _ = fp32
    path = bundle.path("tensorrt/build.sh")
    assert os.stat(path).st_mode & stat.S_IXUSR
    assert "tensorrt/build.sh" in bundle.manifest["files"]
    assert bundle.manifest["targets"]["tensorrt"]["build_script"] == "tensorrt/build.sh"
    text = open(path, encoding="utf-8").read()
    assert text.startswith("#!/bin/sh\n")
    for phrase in ("sh tensorrt/build.sh", "DRY_RUN=1", "trtexec", "refitted at load time", "timing cache"):
        assert phrase in text


@NO_TRT
def test_export_without_tensorrt_says_so_in_one_line_and_marks_engines_pending(fp32):
    bundle, lines = fp32
    assert len(lines) == 1 and "tensorrt/build.sh" in lines[0] and unavailable_reason("tensorrt") in lines[0]
    entry = bundle.manifest["targets"]["tensorrt"]
    assert entry["engines"] is None and "pending" in entry["status"]
    assert not any(rel.endswith(".plan") for rel in bundle.manifest["files"])


@pytest.mark.parametrize("gpu, version", [("NVIDIA H100 80GB HBM3", "10.3.0"), ("Tesla T4", "10.16.1"),
                                          ("NVIDIA GeForce RTX 4090", "11.1.0")])
def test_script_runs_and_computes_the_device_key_as_python_does(fp16, gpu, version):
    bundle, _ = fp16
    done = dry_run(bundle, gpu, version)
    assert done.returncode == 0, done.stderr
    key = engine_key(gpu, version, "fp16")
    assert f"into tensorrt/{key}\n" in done.stdout
    runs = [line.split() for line in done.stdout.splitlines() if line.startswith("trtexec ")]
    assert [r[1] for r in runs] == [f"--onnx=onnx/config_{i}.fp16.onnx" for i in CONFIGS]
    assert all(f"--saveEngine=tensorrt/{key}/config_{i}.plan" in r for i, r in zip(CONFIGS, runs))
    typed = version.startswith("10.")  # TensorRT 11 networks are always strongly typed; --fp16 is gone
    assert all(("--stronglyTyped" in r) == typed and "--fp16" not in r for r in runs)
    assert not os.path.exists(bundle.path("tensorrt/" + key))  # a dry run writes nothing


def test_script_refuses_a_tensorrt_without_weight_stripping(fp32):
    done = dry_run(fp32[0], "Tesla T4", "8.6.1")
    assert done.returncode == 2 and "TensorRT 10 or newer" in done.stderr


# ---- TensorRT's ONNX operator set ------------------------------------------------------------------

def test_parser_support_is_data_with_its_source():
    support = parser_support()
    assert "onnx/onnx-tensorrt" in support["source"] and support["opset"] == {"min": 9, "max": 20}
    assert {"LayerNormalization", "MatMul", "Softmax", "Erf", "Cast"} <= set(support["operators"])
    assert "Unique" not in support["operators"]


def _graph_files(bundle):
    return [rel for rel in bundle.manifest["files"] if rel.endswith(".onnx")]


def test_v1_and_v2_graphs_pass_the_parser_check(fp32, fp16, v2_ckpt, tmp_path):
    v2 = export(sc.load(str(v2_ckpt[0])), str(tmp_path / "v2"), targets="onnx", configs=[0, 14, 80])
    for bundle in (fp32[0], fp16[0], v2):
        for rel in _graph_files(bundle):
            assert unsupported(onnx.load(bundle.path(rel), load_external_data=False)) == [], rel


FAMILIES = {"swin": (swin_tsb, save_swin), "resnet": (resnet_pair, save_timm),
            "resnet_swin": (resnet_swin, save_timm), "levit": (levit_pair, save_deit)}


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_family_graphs_pass_the_parser_check_in_fp32_and_fp16(kind, tmp_path):
    writer, saver = FAMILIES[kind]
    saver(tmp_path / "ckpt.pth", writer()[0])
    net = sc.load(str(tmp_path / "ckpt.pth"))
    stitched = next(c.id for c in net.configs if any(k.startswith("stitch") for k in c.route))
    bundle = export(net, str(tmp_path / "b"), targets="tensorrt", configs=[stitched], precision="fp16",
                    report=lambda line: None)  # export checks fp16 parity against PyTorch itself
    for rel in _graph_files(bundle):
        assert unsupported(onnx.load(bundle.path(rel), load_external_data=False)) == [], rel
    assert_fp16_close(bundle, stitched)


def _write(tmp_path, nodes, opsets, name="bad.onnx") -> dict:
    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in "xy")
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=opsets)
    onnx.save(model, tmp_path / name)
    return {"0": name}


@pytest.mark.parametrize("node, opset, named", [
    (helper.make_node("Foo", ["r"], ["y"], domain="com.example"), 17, "operator com.example::Foo"),
    (helper.make_node("Unique", ["r"], ["y"]), 17, "operator Unique"),
    (helper.make_node("Identity", ["r"], ["y"]), 21, "opset 21 (the parser reads 9..20)"),
])
def test_graphs_the_parser_rejects_are_refused_in_one_line(tmp_path, node, opset, named):
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.example", 1)]
    graphs = _write(tmp_path, [helper.make_node("Relu", ["x"], ["r"]), node], opsets)
    with pytest.raises(StitchError) as err:
        check_graphs(str(tmp_path), graphs)
    message = str(err.value)
    assert named in message and "bad.onnx" in message and "\n" not in message
    check_graphs(str(tmp_path), _write(tmp_path, [helper.make_node("Relu", ["x"], ["y"])],
                                       [helper.make_opsetid("", 17)], "good.onnx"))


# ---- fp16 graphs -----------------------------------------------------------------------------------

def assert_fp16_close(bundle, cid) -> None:
    """fp16 graph vs fp32 graph in ONNX Runtime (CPU), within the fp16 tolerance, float32 at the edges."""
    shared = SharedWeights(bundle.path("onnx"))
    s32 = shared.session(bundle.graph("onnx", cid))
    s16 = shared.session(bundle.graph("tensorrt", cid))
    assert [i.type for i in s16.get_inputs()] == [o.type for o in s16.get_outputs()] == ["tensor(float)"]
    shape = bundle.manifest["input"]["shape"][1:]
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, *shape), dtype=np.float32)
        ref, got = s32.run(None, {"image": x})[0], s16.run(None, {"image": x})[0]
        assert np.abs(got - ref).max() <= REL_TOL["fp16"] * np.abs(ref).max()


def test_fp16_graphs_match_fp32_in_onnxruntime(fp16):
    bundle, _ = fp16
    for cid in CONFIGS:
        assert_fp16_close(bundle, cid)


def test_fp16_graphs_compute_in_fp16_but_normalise_in_fp32(fp16):
    bundle, _ = fp16
    model = shape_inference.infer_shapes(onnx.load(bundle.graph("tensorrt", 8), load_external_data=False))
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    ops = {}
    for node in g.node:
        if node.op_type in ("MatMul", "Erf", "LayerNormalization", "Softmax"):
            ops.setdefault(node.op_type, set()).add(types[node.input[0]])
    assert ops["MatMul"] == ops["Erf"] == {TensorProto.FLOAT16}
    assert ops["LayerNormalization"] == ops["Softmax"] == {TensorProto.FLOAT}


def test_fp16_weights_are_stored_once_at_half_the_bytes(fp16):
    bundle, _ = fp16
    fp32_refs, slots = {}, set()
    for cid in CONFIGS:
        for graph, refs in ((bundle.graph("onnx", cid), fp32_refs), (bundle.graph("tensorrt", cid), None)):
            for t in onnx.load(graph, load_external_data=False).graph.initializer:
                if t.data_location != TensorProto.EXTERNAL:
                    continue
                ref = {e.key: e.value for e in t.external_data}
                if refs is not None:
                    refs[t.name] = int(ref["length"])
                elif ref["location"] == "weights.fp16.bin":
                    assert t.data_type == TensorProto.FLOAT16 and int(ref["length"]) * 2 == fp32_refs[t.name[:-5]]
                    slots.add((int(ref["offset"]), int(ref["length"])))
                else:
                    assert ref["location"] == "weights.bin"  # float32 norm parameters stay in the one store
    stored = sum(length for _, length in slots)
    intervals = sorted(slots)
    assert all(a[0] + a[1] <= b[0] for a, b in zip(intervals, intervals[1:])), "slots overlap"
    assert stored <= os.path.getsize(bundle.path("onnx/weights.fp16.bin")) <= stored + ALIGN * len(slots)
    assert bundle.manifest["targets"]["tensorrt"]["weights"] == ["onnx/weights.bin", "onnx/weights.fp16.bin"]


def test_fp16_bundle_records_and_verifies_its_parity(fp16, v1_ckpt, capsys):
    bundle, _ = fp16
    with open(bundle.path("parity.json")) as f:
        recorded = json.load(f)["targets"]["tensorrt"]
    assert set(recorded) == {str(i) for i in CONFIGS}
    assert all(v["max_rel"] <= REL_TOL["fp16"] for entry in recorded.values() for v in entry.values())
    assert run_cli("verify", bundle.root, "--checkpoint", v1_ckpt[0], "--quiet") == 0
    assert "tensorrt: parity re-run" in capsys.readouterr().out


def test_verify_refuses_a_precision_it_cannot_check(fp16, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(fp16[0].root, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["targets"]["tensorrt"]["precision"] = "fp8"
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli("verify", root) == 2
    assert "targets/tensorrt/precision" in capsys.readouterr().err


# ---- CLI -------------------------------------------------------------------------------------------

def test_cli_options_reuse_and_bad_input(v1_ckpt, tmp_path, capsys):
    out = tmp_path / "b"
    args = ["export", v1_ckpt[0], "--out", out, "--configs", "0", "--targets", "tensorrt", "--quiet"]
    assert run_cli(*args, "--precision", "fp16", "--max-batch", "2") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["targets"]["tensorrt"]["precision"] == "fp16" and manifest["targets"]["tensorrt"]["max_batch"] == 2
    assert run_cli(*args, "--precision", "fp16", "--max-batch", "2") == 0
    assert "up to date" in capsys.readouterr().err
    assert run_cli(*args) == 0  # other options: rebuilt, not reused
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["targets"]["tensorrt"]["precision"] == "fp32" and "onnx/weights.fp16.bin" not in manifest["files"]
    capsys.readouterr()
    for bad in (["--precision", "fp64"], ["--max-batch", "0"]):
        assert run_cli(*args, *bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and bad[0] in err[0]


def test_python_api_refuses_bad_options_before_any_work(v1_net, tmp_path):
    for options, named in (({"precision": "int8"}, "--precision"), ({"max_batch": 0}, "--max-batch")):
        with pytest.raises(StitchError, match=named):
            export(v1_net, str(tmp_path / "b"), targets="tensorrt", configs=[0], **options)
    assert not (tmp_path / "b").exists()


# ---- on a GPU with TensorRT ------------------------------------------------------------------------

def need_tensorrt():
    trt = pytest.importorskip("tensorrt", reason="engines need the tensorrt package (10.x or 11.x) and a CUDA GPU")
    if not torch.cuda.is_available() or unavailable_reason("tensorrt"):
        pytest.skip(f"engines cannot be built here: {unavailable_reason('tensorrt')}")
    return trt


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engines_are_weight_stripped_shared_cache_and_refit_with_parity(v1_net, tmp_path, precision):
    trt = need_tensorrt()
    bundle, lines = _export(v1_net, tmp_path / "b", precision=precision)
    entry = bundle.manifest["targets"]["tensorrt"]
    key = engine_key(torch.cuda.get_device_name(), trt.__version__, precision)
    assert lines == [] and entry["device_key"] == key
    assert entry["engines"] == {str(i): f"tensorrt/{key}/config_{i}.plan" for i in CONFIGS}
    assert entry["timing_cache"] == f"tensorrt/{key}/timing.cache" and entry["timing_cache"] in bundle.manifest["files"]
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    for rel in entry["engines"].values():
        with open(bundle.path(rel), "rb") as f:
            engine = runtime.deserialize_cuda_engine(f.read())
        assert engine is not None and engine.refittable
        if hasattr(trt, "EngineStat"):  # engine statistics came with later 10.x releases
            assert engine.get_engine_stat(trt.EngineStat.STRIPPED_WEIGHTS_SIZE) > 0, f"{rel} holds its weights"
    with open(bundle.path("parity.json")) as f:  # export refitted every engine from the store and ran it
        recorded = json.load(f)["targets"]["tensorrt"]
    assert set(recorded) == {str(i) for i in CONFIGS}
    assert all(v["max_rel"] <= REL_TOL[precision] for e in recorded.values() for v in e.values())


def test_build_script_builds_engines_that_refit_on_this_device(v1_net, fp16, tmp_path):
    trt = need_tensorrt()
    if shutil.which("trtexec") is None:
        pytest.skip("trtexec is not on PATH")
    from stitch_compile.export.parity import Reference
    from stitch_compile.export.tensorrt_target import check_engines

    root = tmp_path / "copy"
    shutil.copytree(fp16[0].root, root)
    key = engine_key(torch.cuda.get_device_name(), trt.__version__, "fp16")
    shutil.rmtree(root / "tensorrt" / key, ignore_errors=True)  # the engines export built: the script makes its own
    done = subprocess.run(["sh", str(root / "tensorrt" / "build.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (root / "tensorrt" / key / "timing.cache").is_file()
    target = {**fp16[0].manifest["targets"]["tensorrt"],
              "engines": {str(i): f"tensorrt/{key}/config_{i}.plan" for i in CONFIGS}}
    check_engines(Reference(v1_net, 0), str(root), target, quiet=True)  # raises over tolerance
