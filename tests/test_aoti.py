"""The aoti target and backend: real AOTInductor packages compiled with this machine's C++ compiler.

One tiny two-anchor SN-Net (6 configs, 10 segments, 8 segment architectures) is exported once per
module; compiling its packages takes about a minute on two cores.
"""

import contextlib
import json
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import torch
from tqdm import tqdm

import stitch_compile
from snnet_reference import write_v1
from stitch_compile.aotiweights import build_key
from stitch_compile.bundle import sha256_file
from stitch_compile.cli import Terminated, _terminate
from stitch_compile.export.aoti_target import _compile_in_workers
from stitch_compile.errors import StitchError
from stitch_compile.hardware import torch_device
from stitch_compile.runtime import Runtime

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="AOTInductor needs a C++ compiler")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TINY = dict(widths=(32, 64), depth=2, img=16, patch=8, classes=10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("aoti")
    write_v1(root / "tiny.pth", **TINY)
    net = stitch_compile.load(str(root / "tiny.pth"))
    stitch_compile.export(net, str(root / "bundle"), targets="onnx,aoti", report=lambda line: None)
    return net, root


@pytest.fixture
def bundle(tiny, tmp_path):
    """A private copy of the exported bundle, free to tamper with."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny[1] / "bundle", dst)
    return dst


def manifest(bundle_dir) -> dict:
    with open(os.path.join(bundle_dir, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def the_build(m: dict) -> tuple[str, dict]:
    (key, build), = m["targets"]["aoti"]["builds"].items()
    return key, build


def images(batch=3, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 3, TINY["img"], TINY["img"]), dtype=np.float32)


def rel_err(got, ref) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def test_segments_of_one_architecture_share_a_package_and_no_weight_is_stored_twice(tiny):
    net, root = tiny
    m = manifest(root / "bundle")
    key, build = the_build(m)
    assert key == build_key(torch_device("cpu")) and build["device"] == "cpu"
    assert set(build["segments"]) == set(m["segments"])
    assert len(build["packages"]) == 8 < len(build["segments"])  # block:a:0 and block:a:1 share one
    assert build["segments"]["block:0:0"] == build["segments"]["block:0:1"]
    with open(root / "bundle" / build["constants"], encoding="utf-8") as f:
        constants = json.load(f)["segments"]
    block = constants["block:1:0"]
    assert block and all(c["file"] == "onnx/weights.bin" for c in block.values())
    # the Linear weights are compiled in the ONNX store's (transposed) layout, so their bytes are shared
    assert any(c["shape"] == [64, 192] for c in block.values())
    assert build["derived_bytes"] < 0.001 * m["weights"]["unique_bytes"]
    for pkg in build["packages"].values():  # code only: far smaller than the weights
        assert os.path.getsize(root / "bundle" / pkg) < 8 << 20


def test_every_config_passed_parity_at_export(tiny):
    net, root = tiny
    m = manifest(root / "bundle")
    key, _ = the_build(m)
    with open(root / "bundle" / "parity.json", encoding="utf-8") as f:
        parity = json.load(f)["targets"][f"aoti:{key}"]
    assert set(parity) == {str(c["id"]) for c in m["configs"]}
    assert max(v["max_rel"] for entry in parity.values() for v in entry.values()) < 1e-4


def test_runtime_runs_every_config_like_pytorch(tiny):
    net, root = tiny
    rt = Runtime(str(root / "bundle"), backend="aoti", threads=1)
    assert "-aoti" in rt.device_key
    x = images()
    for cid in rt.config_ids:
        with torch.no_grad():
            ref = net(torch.from_numpy(x), cid).numpy()
        assert rel_err(rt.run(x, cid), ref) < 1e-4
        got = rt.runner(cid)(torch.from_numpy(x))  # a device tensor in, a device tensor out
        assert isinstance(got, torch.Tensor) and rel_err(got.numpy(), ref) < 1e-4


@pytest.mark.parametrize("bad", ["float64", "float16", "small image", "no batch", "numpy float64"])
def test_runners_refuse_inputs_unlike_the_traced_one(tiny, bad):
    """AOTInductor itself would read such a buffer as the traced one, past its end."""
    rt = Runtime(str(tiny[1] / "bundle"), backend="aoti", threads=1)
    x = torch.from_numpy(images(2))
    x = {"float64": x.double(), "float16": x.half(), "small image": x[:, :, :8, :8], "no batch": x[0],
         "numpy float64": x.double().numpy()}[bad]
    with pytest.raises(stitch_compile.StitchError, match=r"this runner takes float32 \[batch, 3, 16, 16\]"):
        rt.runner(rt.config_ids[0])(x)


def test_runners_take_non_contiguous_tensors(tiny):
    net, root = tiny
    rt = Runtime(str(root / "bundle"), backend="aoti", threads=1)
    x = torch.from_numpy(images(2)).permute(0, 1, 3, 2)  # the same image batch, transposed strides
    with torch.no_grad():
        ref = net(x, rt.config_ids[-1]).numpy()
    assert rel_err(rt.runner(rt.config_ids[-1])(x).numpy(), ref) < 1e-4


def concurrent_errors(rt: Runtime, x: np.ndarray, refs: dict, own_streams: bool = False) -> list[float]:
    """Four threads cycling through the configs at once (each on its own CUDA stream if asked):
    the relative error of each of their 48 outputs."""
    errors = []

    def worker(offset):
        with torch.cuda.stream(torch.cuda.Stream()) if own_streams else contextlib.nullcontext():
            for i in range(12):
                cid = rt.config_ids[(offset + i) % len(rt.config_ids)]
                errors.append(rel_err(rt.run(x, cid), refs[cid]))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_threads_running_different_configs_get_their_own_outputs(tiny):
    net, root = tiny
    rt = Runtime(str(root / "bundle"), backend="aoti", threads=1)
    x = images(2)
    with torch.no_grad():
        refs = {cid: net(torch.from_numpy(x), cid).numpy() for cid in rt.config_ids}
    errors = concurrent_errors(rt, x, refs)
    assert len(errors) == 48 and max(errors) < 1e-4


def test_bench_and_select_with_the_aoti_backend(cli, bundle):
    code, out, err = cli("bench", str(bundle), "--backend", "aoti", "--batch", "1,2", "--runs", "3", "--warmup", "1",
                         "--threads", "1", "--quiet")
    assert code == 0, err
    (name,) = os.listdir(bundle / "lut")
    with open(bundle / "lut" / name, encoding="utf-8") as f:
        lut = json.load(f)
    assert lut["device"]["backend"] == "aoti" and lut["device"]["build"] == the_build(manifest(bundle))[0]
    assert set(lut["latency"]) == {"1", "2"} and len(lut["latency"]["1"]) == 6
    code, out, err = cli("select", str(bundle), "--backend", "aoti", "--threads", "1", "--budget-ms", "1000")
    assert code == 0 and out.startswith("config ") and "aoti" in out
    code, out, err = cli("select", str(bundle), "--threads", "1", "--budget-ms", "1000")  # ort: not benched
    assert code == 2 and "bench" in err and "ort" in err


def test_export_again_reuses_the_bundle(cli, tiny):
    net, root = tiny
    before = manifest(root / "bundle")["files"]
    code, out, err = cli("export", str(root / "tiny.pth"), "--targets", "aoti", "--out", str(root / "bundle"), "--quiet")
    assert code == 0 and "up to date" in err
    assert manifest(root / "bundle")["files"] == before


def one_line(code, err, *needles):
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("change,needle", [
    (lambda c: c["block:0:0"].__setitem__(next(iter(c["block:0:0"])), {"file": "onnx/weights.bin", "offset": 1 << 40,
                                                                         "bytes": 4, "dtype": "float32", "shape": [1]}),
     "points outside"),
    (lambda c: c["stem:0"].update({next(iter(c["stem:0"])): {"file": "../../etc/passwd", "offset": 0, "bytes": 4,
                                                             "dtype": "float32", "shape": [1]}}), "not a weight file"),
    (lambda c: c["head:1"].pop(next(iter(c["head:1"]))), "constants"),
])
def test_tampered_constants_are_one_error_line(cli, bundle, change, needle):
    _, build = the_build(manifest(bundle))
    path = bundle / build["constants"]
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    change(data["segments"])
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    m = manifest(bundle)  # a consistent forgery: the manifest's size and hash follow the file
    m["files"][build["constants"]] = {"sha256": sha256_file(str(path)), "bytes": os.path.getsize(path)}
    with open(bundle / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(m, f)
    code, out, err = cli("bench", str(bundle), "--backend", "aoti", "--runs", "1", "--warmup", "0", "--quiet")
    one_line(code, err, needle)
    assert not (bundle / "lut").exists()


def test_a_route_whose_segments_do_not_fit_is_refused_before_a_package_reads_it(bundle):
    """A package reads any buffer as the shape it was traced with: a tampered route must stop in
    the chain, not read out of bounds (the ONNX Runtime backend refuses it when loading)."""
    m = manifest(bundle)
    config = next(c for c in m["configs"] if any(key.startswith("stitch:") for key in c["route"]))
    config["route"] = [key for key in config["route"] if not key.startswith("stitch:")]
    with open(bundle / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(m, f)
    rt = Runtime(str(bundle), backend="aoti", threads=1)
    with pytest.raises(StitchError, match=r"segment 'block:1:.*' takes \[batch, .*\] but gets \[3, "):
        rt.run(images(), config["id"])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_runtimes_with_other_thread_counts_share_a_process(tiny):
    """torch's thread count (AOTInductor's CPU kernels use it) is per-process state: each runtime
    sets its own for its runs only, so a later runtime does not change an earlier one's, nor the
    caller's torch."""
    from stitch_compile.runtime.aoti_backend import _with_threads
    net, root = tiny
    before = torch.get_num_threads()
    runtimes = {t: Runtime(str(root / "bundle"), backend="aoti", threads=t) for t in (2, 1)}
    assert torch.get_num_threads() == before
    seen = [_with_threads(lambda _: torch.get_num_threads(), t)(None) for t in (1, 2)]
    assert seen == [1, 2] and torch.get_num_threads() == before
    x = images()
    with torch.no_grad():
        ref = net(torch.from_numpy(x), 0).numpy()
    assert all(rel_err(rt.run(x, 0), ref) < 1e-4 for rt in runtimes.values())
    assert torch.get_num_threads() == before


def test_batches_beyond_the_exported_range_are_refused(bundle):
    m = manifest(bundle)
    key, _ = the_build(m)
    m["targets"]["aoti"]["builds"][key]["max_batch"] = 2
    with open(bundle / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(m, f)
    rt = Runtime(str(bundle), backend="aoti", threads=1)
    with pytest.raises(stitch_compile.StitchError, match="batches of 1 to 2"):
        rt.run(images(3), rt.config_ids[0])


def test_bundles_without_a_build_for_this_device_say_how_to_make_one(cli, bundle):
    m = manifest(bundle)
    m["targets"]["aoti"]["builds"] = {"cpu-another-cpu-torch2.14": the_build(m)[1]}
    with open(bundle / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(m, f)
    code, out, err = cli("bench", str(bundle), "--backend", "aoti", "--quiet")
    one_line(code, err, "no AOTInductor build for this device", "cpu-another-cpu-torch2.14", "--targets aoti")


def test_option_mismatches_are_one_error_line(cli, bundle):
    one_line(*cli("bench", str(bundle), "--cuda-graphs")[::2], "--backend aoti")
    one_line(*cli("bench", str(bundle), "--backend", "aoti", "--mode", "graphs")[::2], "--backend ort")
    one_line(*cli("bench", str(bundle), "--backend", "aoti", "--device", "tpu")[::2], "'tpu'")
    if not torch.cuda.is_available():
        one_line(*cli("bench", str(bundle), "--backend", "aoti", "--device", "cuda")[::2], "no CUDA GPU")
        one_line(*cli("bench", str(bundle), "--device", "cuda:0")[::2], "no CUDA GPU")  # cuda means aoti
        one_line(*cli("bench", str(bundle), "--backend", "aoti", "--cuda-graphs")[::2], "CUDA device")


@cuda
def test_cuda_build_with_graphs_equals_pytorch(tiny, tmp_path):
    net, root = tiny
    out = tmp_path / "bundle"
    shutil.copytree(root / "bundle", out)
    stitch_compile.export(net, str(out), targets="onnx,aoti", device="cuda", report=lambda line: None)
    builds = manifest(out)["targets"]["aoti"]["builds"]
    assert {b["device"] for b in builds.values()} == {"cpu", "cuda"}  # the CPU build was kept
    x = images(4)
    for graphs in (False, True):
        rt = Runtime(str(out), device="cuda", backend="aoti", cuda_graphs=graphs)
        for cid in rt.config_ids:
            with torch.no_grad():
                ref = net(torch.from_numpy(x), cid).numpy()
            assert rel_err(rt.run(x, cid), ref) < 1e-4
            assert rel_err(rt.run(x, cid), ref) < 1e-4  # a replay, when captured
    # callers on their own streams, capturing (batch 2 is new) and replaying at once: captures must
    # tolerate the other threads' CUDA calls, and replays over the graphs' one pool must not overlap
    x = images(2)
    with torch.no_grad():
        refs = {cid: net(torch.from_numpy(x), cid).numpy() for cid in rt.config_ids}
    errors = concurrent_errors(rt, x, refs, own_streams=True)
    assert len(errors) == 48 and max(errors) < 1e-4


def test_verify_rechecks_the_aoti_build_and_skips_builds_for_other_devices(cli, tiny, bundle):
    net, root = tiny
    key, _ = the_build(manifest(bundle))
    code, out, err = cli("verify", str(bundle), "--checkpoint", str(root / "tiny.pth"), "--quiet")
    assert code == 0, err
    assert f"aoti:{key}: 6 configs, recorded" in out and f"aoti:{key}: parity re-run" in out
    m = manifest(bundle)  # the same build, claimed for a GPU this machine does not have
    m["targets"]["aoti"]["builds"]["cuda-some-gpu-torch2.14"] = {**m["targets"]["aoti"]["builds"][key], "device": "cuda"}
    with open(bundle / "parity.json", encoding="utf-8") as f:
        parity = json.load(f)
    parity["targets"]["aoti:cuda-some-gpu-torch2.14"] = parity["targets"][f"aoti:{key}"]
    with open(bundle / "parity.json", "w", encoding="utf-8") as f:
        json.dump(parity, f)
    m["files"]["parity.json"] = {"sha256": sha256_file(str(bundle / "parity.json")),
                                 "bytes": os.path.getsize(bundle / "parity.json")}
    with open(bundle / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(m, f)
    code, out, err = cli("verify", str(bundle), "--checkpoint", str(root / "tiny.pth"), "--quiet")
    assert code == 0, err
    assert "aoti:cuda-some-gpu-torch2.14: built for another device" in out


@pytest.mark.slow
def test_parallel_compile_workers_build_the_same_bundle(tiny, tmp_path):
    net, root = tiny
    stitch_compile.export(net, str(tmp_path / "b"), targets="onnx,aoti", jobs=2, report=lambda line: None)
    ours, theirs = manifest(tmp_path / "b"), manifest(root / "bundle")
    (_, a), (_, b) = the_build(ours), the_build(theirs)
    assert a["segments"] == b["segments"] and a["packages"] == b["packages"]
    assert ours["files"][a["constants"]] == theirs["files"][b["constants"]]  # byte-identical constants.json
    rt = Runtime(str(tmp_path / "b"), backend="aoti", threads=1)
    x = images()
    with torch.no_grad():
        assert all(rel_err(rt.run(x, cid), net(torch.from_numpy(x), cid).numpy()) < 1e-4 for cid in rt.config_ids)


def _compile_blocked_workers(work: dict, stop) -> tuple[BaseException | None, bool]:
    """Run ``_compile_in_workers`` on ``work``, where programs named 'fifo*' are FIFOs that block
    their worker's read; ``stop()`` runs once those workers exist. What it raised, and whether a
    watchdog had to kill the blocked workers after two minutes (a parent that waits for its
    workers fails the test instead of hanging it)."""
    fifos = [program for program, _ in work.values() if os.path.basename(program).startswith("fifo")]
    for fifo in fifos:
        os.mkfifo(fifo)

    def workers() -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
                found += [int(pid) for fifo in fifos if fifo.encode() in cmdline]
        return found

    rescued, done = threading.Event(), threading.Event()

    def watch():
        while len(workers()) < len(fifos) and not done.is_set():
            time.sleep(0.05)
        stop()
        if not done.wait(120):
            rescued.set()
            for pid in workers():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()
    caught = None
    try:
        _compile_in_workers(work, jobs=len(work), bar=tqdm(disable=True))
    except (StitchError, Terminated) as exc:
        caught = exc
    done.set()
    assert not workers(), "a worker outlived the compile"
    return caught, rescued.is_set()


def test_interrupted_parallel_compile_kills_its_workers(tmp_path):
    """SIGTERM to the CLI (Ctrl-C alike) stops the running compiles at once instead of waiting
    minutes for them: the workers never see the parent's SIGTERM."""
    work = {f"a{i}": (str(tmp_path / f"fifo{i}"), str(tmp_path / f"a{i}.pt2")) for i in range(2)}
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        caught, rescued = _compile_blocked_workers(work, stop=lambda: os.kill(os.getpid(), signal.SIGTERM))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert isinstance(caught, Terminated) and not rescued


def test_a_failed_parallel_compile_stops_the_others(tmp_path):
    """Whichever compile fails first, however many were started before it."""
    work = {"slow": (str(tmp_path / "fifo"), str(tmp_path / "slow.pt2")),
            "bad": (str(tmp_path / "missing.ep.pt2"), str(tmp_path / "bad.pt2"))}
    caught, rescued = _compile_blocked_workers(work, stop=lambda: None)
    assert isinstance(caught, StitchError) and "compiling a segment failed" in str(caught) and not rescued
