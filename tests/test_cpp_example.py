"""examples/cpp: the C++ program that runs a bundle's AOTInductor CPU packages.

Built once per session with CMake against the pip wheel's libtorch, then run on a real bundle of a
tiny v1 net (2 anchors of 2 blocks, 16x16 images, 6 configs) exported with the ``aoti`` target and
benched with the Python runtime: it must choose the config the Python runtime chooses, return the
Python runtime's logits, and turn bad input into one error line with exit code 2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from snnet_reference import write_v1

import stitch_compile as sc
from stitch_compile.accuracy import import_results
from stitch_compile.bench import bench
from stitch_compile.bundle import sha256_file
from stitch_compile.export import export

pytestmark = pytest.mark.slow

SOURCE = Path(__file__).resolve().parents[1] / "examples" / "cpp"
CMAKE = shutil.which("cmake")
CXX = next((shutil.which(c) for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)), None)
if CMAKE is None or CXX is None:
    pytest.skip(f"the C++ example needs {'cmake' if CMAKE is None else 'a C++ compiler (c++, g++ or clang++)'}, "
                "which this machine does not have", allow_module_level=True)

SHAPE = {"widths": (64, 128), "depth": 2, "img": 16, "patch": 8, "classes": 10}  # 6 configs, 11 segments
LINE = re.compile(r"config (\d+): (\d+\.\d{3}) ms in the LUT( \(predicted\))?, accuracy (\S+)")


@pytest.fixture(scope="module")
def binary(tmp_path_factory) -> Path:
    """examples/cpp configured and built with the documented commands (plus the ABI torch reports)."""
    build = tmp_path_factory.mktemp("stitch_infer_build")
    configure = [CMAKE, "-S", str(SOURCE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DCMAKE_CXX_COMPILER={CXX}",
                 f"-DSTITCH_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
    if shutil.which("ninja"):
        configure[1:1] = ["-G", "Ninja"]
    for cmd in (configure, [CMAKE, "--build", str(build), "-j2"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
        if done.returncode:
            pytest.fail(f"{' '.join(cmd)} failed:\n{(done.stdout + done.stderr)[-6000:]}")
    exe = build / "stitch_infer"
    assert exe.is_file()
    return exe


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(net, bundle root): onnx + aoti targets for the CPU, with an aoti LUT measured at batch 1."""
    folder = tmp_path_factory.mktemp("cpp_example")
    write_v1(folder / "snnet.pth", **SHAPE)
    net = sc.load(str(folder / "snnet.pth"))
    root = export(net, str(folder / "bundle"), targets="onnx,aoti", device="cpu").root
    bench(sc.Runtime(root, backend="aoti", threads=1), batches=[1], runs=10, warmup=2)
    return net, str(root)


@pytest.fixture(scope="module")
def runtime(exported):
    return sc.Runtime(exported[1], backend="aoti", threads=1)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    x = np.random.default_rng(0).standard_normal((3, 3, SHAPE["img"], SHAPE["img"]), dtype=np.float32)
    path = tmp_path_factory.mktemp("images") / "images.npy"
    np.save(path, x)
    return x, str(path)


@pytest.fixture
def bundle(exported, tmp_path):
    """A private copy, for tests that change it."""
    return str(shutil.copytree(exported[1], tmp_path / "bundle"))


def run(binary, bundle, *args):
    done = subprocess.run([str(binary), bundle, *map(str, args)], capture_output=True, text=True, timeout=300,
                          check=False)
    return done.returncode, done.stdout, done.stderr


def lut_latencies(bundle) -> list[float]:
    (name,) = [n for n in os.listdir(os.path.join(bundle, "lut")) if n.endswith(".json")]
    with open(os.path.join(bundle, "lut", name)) as f:
        return sorted({e["p50_ms"] for e in json.load(f)["latency"]["1"].values()})


def rel_err(got, ref) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def one_line_error(code, out, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert out == "", out
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def check_run(binary, bundle, rt, x, path, budget, tmp_path, metric="p50"):
    """Run the program at ``budget``; it must pick the Python runtime's config and return its logits."""
    logits = tmp_path / f"logits-{budget!r}-{metric}.txt"
    code, out, err = run(binary, bundle, "--budget-ms", repr(budget), "--input", path, "--metric", metric,
                         "--output", logits)
    assert code == 0, err
    choice = rt.choice(budget, metric=metric)
    lines = out.splitlines()
    head = LINE.fullmatch(lines[0])
    assert head, lines[0]
    assert int(head[1]) == choice.id and head[2] == f"{choice.latency_ms:.3f}", (lines[0], choice)
    assert head[4] == ("n/a" if choice.accuracy is None else f"{choice.accuracy:g}")
    got = np.loadtxt(logits, ndmin=2)
    assert got.shape == (len(x), SHAPE["classes"])
    assert rel_err(got, rt.run(x, choice.id)) < 1e-4
    assert lines[1:] == [f"image {i}: class {int(np.argmax(row))} (logit {row.max():.6g})" for i, row in enumerate(got)]
    return choice.id


# --- choosing and running configs --------------------------------------------------------------

def test_every_config_chosen_by_its_latency_equals_the_python_runtime(binary, exported, runtime, images, tmp_path):
    net, root = exported
    x, path = images
    latencies = lut_latencies(root)
    chosen = {check_run(binary, root, runtime, x, path, ms, tmp_path) for ms in latencies + [1e6]}
    assert len(chosen) >= 2  # without accuracy, each budget takes the most FLOPs that fit
    with torch.no_grad():  # and the chain is the network's own forward
        for cid in chosen:
            assert rel_err(runtime.run(x, cid), net(torch.from_numpy(x), cid).numpy()) < 1e-4, cid


def test_accuracy_outranks_flops_and_p99_is_used_when_asked(binary, bundle, images, tmp_path):
    x, path = images
    with open(os.path.join(bundle, "results.txt"), "w") as f:  # the smallest anchor becomes the best
        f.writelines(json.dumps({"cfg_id": c, "acc1": a}) + "\n" for c, a in {0: 80.0, 1: 75.0, 3: 79.0}.items())
    import_results(bundle, os.path.join(bundle, "results.txt"))
    rt = sc.Runtime(bundle, backend="aoti", threads=1, preload=False)
    for ms in lut_latencies(bundle) + [1e6]:
        check_run(binary, bundle, rt, x, path, ms, tmp_path)
    assert check_run(binary, bundle, rt, x, path, 1e6, tmp_path) == 0
    for ms in lut_latencies(bundle)[-2:]:
        check_run(binary, bundle, rt, x, path, ms, tmp_path, metric="p99")


def test_equal_accuracy_goes_to_the_faster_config_not_the_bigger_one(binary, bundle, images, tmp_path):
    x, path = images
    rt = sc.Runtime(bundle, backend="aoti", threads=1, preload=False)
    with open(os.path.join(bundle, "results.txt"), "w") as f:
        f.writelines(json.dumps({"cfg_id": c, "acc1": 80.0}) + "\n" for c in rt.config_ids)
    import_results(bundle, os.path.join(bundle, "results.txt"))
    rt = sc.Runtime(bundle, backend="aoti", threads=1, preload=False)
    fastest = rt.choice(lut_latencies(bundle)[0]).id
    assert {check_run(binary, bundle, rt, x, path, ms, tmp_path) for ms in lut_latencies(bundle) + [1e6]} == {fastest}


def test_threads_and_options_do_not_change_the_logits(binary, exported, runtime, images, tmp_path):
    _, root = exported
    x, path = images
    budget = lut_latencies(root)[-1]
    cid = runtime.select(budget)
    for extra in (["--threads", "2"], ["--batch-lut", "1", "--threads", "1"]):
        out_file = tmp_path / "logits.txt"
        code, out, err = run(binary, root, "--budget-ms", budget, "--input", path, "--output", out_file, *extra)
        assert code == 0, err
        assert out.startswith(f"config {cid}:")
        assert rel_err(np.loadtxt(out_file, ndmin=2), runtime.run(x, cid)) < 1e-4


# --- bad input -----------------------------------------------------------------------------------

def test_a_budget_no_config_fits_is_one_line(binary, exported, images):
    _, root = exported
    fastest = lut_latencies(root)[0]
    line = one_line_error(*run(binary, root, "--budget-ms", fastest / 2, "--input", images[1]),
                          "no config fits", "raise the budget")
    assert f"at {fastest:.3f} ms" in line
    one_line_error(*run(binary, root, "--budget-ms", "-3", "--input", images[1]), "budget")
    one_line_error(*run(binary, root, "--budget-ms", 10, "--input", images[1], "--batch-lut", 8),
                   "no entries for batch 8", "or pass --batch-lut 1")
    one_line_error(*run(binary, root, "--budget-ms", 10, "--input", images[1], "--metric", "p95"), "p95")
    one_line_error(*run(binary, root, "--budget-ms", 10, "--input", images[1], "--frobnicate"), "--frobnicate")


@pytest.mark.parametrize("shape, dtype, needle", [
    ((2, 3, 8, 8), np.float32, "this bundle takes [batch, 3, 16, 16]"),
    ((2, 16, 16), np.float32, "this bundle takes [batch, 3, 16, 16]"),
    ((2, 3, 16, 16), np.float64, "'<f8'"),
])
def test_a_wrong_input_is_one_line(binary, exported, tmp_path, shape, dtype, needle):
    path = tmp_path / "bad.npy"
    np.save(path, np.zeros(shape, dtype=dtype))
    one_line_error(*run(binary, exported[1], "--budget-ms", 1e6, "--input", path), needle)
    one_line_error(*run(binary, exported[1], "--budget-ms", 1e6, "--input", tmp_path / "missing.npy"), "missing.npy")


def _manifest(bundle, change):
    path = os.path.join(bundle, "manifest.json")
    with open(path) as f:
        data = json.load(f)
    change(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _build(data) -> dict:
    (build,) = data["targets"]["aoti"]["builds"].values()
    return build


def _first_package(data, rel):
    build = _build(data)
    build["packages"][min(build["packages"])] = rel


def _constants(bundle, change, record=True):
    """Apply ``change`` to every segment's constants (only the chosen route's are read); with
    ``record``, also record the new file in the manifest, as a deliberate tamperer would."""
    with open(os.path.join(bundle, "manifest.json")) as f:
        rel = _build(json.load(f))["constants"]
    path = os.path.join(bundle, rel)
    with open(path) as f:
        data = json.load(f)
    for segment in data["segments"].values():
        change(segment)
    with open(path, "w") as f:
        json.dump(data, f)
    if record:
        _manifest(bundle, lambda d: d["files"][rel].update(bytes=os.path.getsize(path), sha256=sha256_file(path)))


def _first_entry(segment) -> dict:
    return segment[min(segment)]


def _append(bundle, rel, text):
    with open(os.path.join(bundle, rel), "a") as f:
        f.write(text)


def _link_outside(bundle, rel):
    """``rel`` becomes a symbolic link to the same file, moved out of the bundle."""
    path = os.path.join(bundle, rel)
    outside = os.path.join(os.path.dirname(bundle), "outside-" + os.path.basename(rel))
    shutil.move(path, outside)
    os.symlink(outside, path)


@pytest.mark.parametrize("tamper, needles", [
    (lambda b: _manifest(b, lambda d: _first_package(d, "../../outside.pt2")), ["leaves the bundle", "tampered"]),
    (lambda b: _manifest(b, lambda d: _build(d).update(constants="/etc/passwd")), ["not a relative bundle path"]),
    (lambda b: shutil.rmtree(os.path.join(b, "lut")), ["stitch-compile bench", "--backend aoti"]),
    (lambda b: _manifest(b, lambda d: d["targets"].pop("aoti")), ["--targets aoti --device cpu"]),
    (lambda b: _manifest(b, lambda d: _build(d).update(device="cuda")), ["--targets aoti --device cpu"]),
    (lambda b: _append(b, "manifest.json", "}"), ["corrupt manifest"]),
    (lambda b: _link_outside(b, "onnx/weights.bin"), ["'onnx/weights.bin' leaves the bundle", "tampered"]),
    (lambda b: _manifest(b, lambda d: [c.update(route=["stem:0", "head:1"]) for c in d["configs"]]),
     ["segment 'head:1' takes [3, 5, 128] but gets [3, 5, 64]", "tampered"]),
    (lambda b: _constants(b, lambda s: _first_entry(s).update(offset=1 << 40)), ["lie outside"]),
    (lambda b: _constants(b, lambda s: _first_entry(s).update(bytes=4)), ["bytes': 4 bytes, but"]),
    (lambda b: _constants(b, lambda s: s.pop(min(s))), ["has no entry for constant"]),
    (lambda b: _constants(b, lambda s: s.update(extra=_first_entry(s))), ["'extra'"]),
])
def test_a_tampered_bundle_is_one_line(binary, bundle, images, tamper, needles):
    tamper(bundle)
    one_line_error(*run(binary, bundle, "--budget-ms", 1e6, "--input", images[1]), *needles)


def test_bounds_checks_are_not_integrity_checks_verify_is(binary, bundle, images, cli):
    """Constants moved to other bytes of their weight file stay inside it, so the program runs them:
    its checks only keep it within the bundle's files. What finds the change is the manifest's
    checksums, which `stitch-compile verify` checks (README: run it before deploying a bundle)."""
    _constants(bundle, lambda s: _first_entry(s).update(offset=0), record=False)
    code, out, err = run(binary, bundle, "--budget-ms", 1e6, "--input", images[1])
    assert code == 0 and out.startswith("config "), err
    code, _, err = cli("verify", bundle)
    assert code == 2 and "constants.json" in err and "tampered" in err, err
