"""Runtime, bench, select, accuracy and plot over real bundles exported from the tiny v1 fixture."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import stitch_compile as sc
from stitch_compile.accuracy import evaluate, import_results, store_accuracy
from stitch_compile.bench import bench
from stitch_compile.images import load_image
from stitch_compile.bundle import load_bundle, sha256_file
from stitch_compile.export import export
from stitch_compile.ortweights import SharedWeights
from stitch_compile.runtime.lut import FORMAT, VERSION

SUBSET = [0, 1, 2, 3, 20, 36, 37, 45, 70]  # anchors, both pairs, k <= j re-runs (3: (0,0))


@pytest.fixture(scope="module")
def exported(v1_net, tmp_path_factory):
    """The subset exported once (onnx + ort targets): the pristine bundle every test copies from."""
    out = tmp_path_factory.mktemp("runtime") / "bundle"
    return export(v1_net, str(out), targets="onnx,ort", configs=SUBSET).root


@pytest.fixture
def bundle(exported, tmp_path):
    """A private copy, so tests may write LUTs and accuracy into it."""
    return shutil.copytree(exported, tmp_path / "bundle")


@pytest.fixture(scope="module")
def runtime(exported):
    return sc.Runtime(exported)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)


@pytest.fixture(scope="module")
def reference(v1_net, images):
    with torch.no_grad():
        return {cid: v1_net(torch.from_numpy(images), cid).numpy() for cid in SUBSET}


def rel_err(got, ref) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def one_line_error(code, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- running configs -------------------------------------------------------------------------

def test_every_config_equals_pytorch(runtime, images, reference):
    assert sorted(runtime.config_ids) == SUBSET
    for cid in SUBSET:
        assert rel_err(runtime.run(images, config=cid), reference[cid]) < 1e-4, cid


@pytest.mark.parametrize("options", [{"mode": "graphs"}, {"threads": 1}])
def test_graph_mode_and_per_session_threads_equal_pytorch(exported, images, reference, options):
    rt = sc.Runtime(exported, **options)
    assert ("-graphs" in rt.device_key) == (options.get("mode") == "graphs")
    for cid in (0, 3, 37, 70):
        assert rel_err(rt.run(images, cid), reference[cid]) < 1e-4, cid


def test_all_configs_resident_over_one_copy_of_each_segment(runtime):
    routes = [runtime.bundle.config(c)["route"] for c in SUBSET]
    assert set(runtime.backend._segments) == {k for route in routes for k in route}
    runners = {cid: runtime.runner(cid) for cid in SUBSET}
    runtime.run(np.zeros((1, 3, 32, 32), np.float32), 37)
    assert all(runtime.runner(cid) is runners[cid] for cid in SUBSET)  # switching reloads nothing
    stored = set()  # (file, offset) of every weight the loaded segments use
    for key in runtime.backend._segments:
        path = runtime.bundle.path(runtime.bundle.manifest["segments"][key]["file"])
        graph = onnx.load(path, load_external_data=False)
        for t in graph.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                stored.add((info["location"], int(info["offset"])))
    assert len(runtime.backend.weights._values) == len(stored)  # one mapped view per stored tensor


def test_running_a_bundle_imports_neither_torch_nor_timm(exported):
    """They cost a process seconds and hundreds of MB (benchmarks/footprint.py): the ONNX Runtime
    path, from ``import stitch_compile`` through ``select`` on the command line, needs neither."""
    code = "\n".join([
        "import sys, numpy as np, stitch_compile as sc",
        f"rt = sc.Runtime({str(exported)!r})",
        "rt.run(np.zeros((1, *rt.input_shape), np.float32), rt.config_ids[-1])",
        "from stitch_compile.cli import main",
        "main(['inspect', rt.bundle.root])",
        "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", done


def test_many_threads_with_different_configs_get_their_own_outputs(runtime, images, reference):
    failures, rng_seeds = [], range(8)

    def worker(seed):
        rng = np.random.default_rng(seed)
        for _ in range(12):
            cid = int(rng.choice(SUBSET))
            got = runtime.run(images, cid)
            if rel_err(got, reference[cid]) > 1e-4:
                failures.append(cid)

    threads = [threading.Thread(target=worker, args=(s,)) for s in rng_seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_lazy_mode_creates_each_config_once_on_first_use(exported, images, reference):
    rt = sc.Runtime(exported, preload=False)
    assert not rt._runners and not rt.backend._segments
    created, original = [], rt.backend.config_runner

    def counting(cid):
        created.append(cid)
        return original(cid)

    rt.backend.config_runner = counting
    outputs = {}
    barrier = threading.Barrier(6)

    def worker(i):
        barrier.wait()
        outputs[i] = rt.run(images, 37 if i % 2 else 70)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(created) == [37, 70]
    assert all(rel_err(y, reference[37 if i % 2 else 70]) < 1e-4 for i, y in outputs.items())
    assert set(rt.backend._segments) == set(rt.bundle.config(37)["route"]) | set(rt.bundle.config(70)["route"])


def test_bad_input_and_unknown_config_are_stitch_errors(runtime, images):
    with pytest.raises(sc.StitchError, match="unknown config id 5"):
        runtime.run(images, 5)
    runtime.run(images, 1)  # resident now: the ids below must not reach it by hashing like 1
    for not_an_id in (True, 1.0, "1", None):
        with pytest.raises(sc.StitchError, match=f"unknown config id {not_an_id!r}"):
            runtime.run(images, not_an_id)
    np.testing.assert_array_equal(runtime.run(images, np.int64(1)), runtime.run(images, 1))
    with pytest.raises(sc.StitchError, match=r"takes \[batch, 3, 32, 32\]"):
        runtime.run(images[:, :, :16], 0)
    with pytest.raises(sc.StitchError, match="runs on 'cpu' only; use --backend aoti"):
        sc.Runtime(runtime.bundle, device="cuda", backend="ort", preload=False)


def test_tampered_external_data_range_is_refused(exported):
    tensor = onnx.helper.make_tensor("w", onnx.TensorProto.FLOAT, [4], [0.0] * 4)
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    size = os.path.getsize(os.path.join(exported, "onnx", "weights.bin"))
    for location, offset in (("weights.bin", size - 8), ("../manifest.json", 0)):
        del tensor.external_data[:]
        for k, v in (("location", location), ("offset", str(offset)), ("length", "16")):
            entry = tensor.external_data.add()
            entry.key, entry.value = k, v
        with pytest.raises(sc.StitchError, match="tampered"):
            SharedWeights(os.path.join(exported, "onnx")).value(tensor)


# --- bench and the LUT ---------------------------------------------------------------------

def read_lut(bundle_dir) -> dict:
    (name,) = os.listdir(os.path.join(bundle_dir, "lut"))
    with open(os.path.join(bundle_dir, "lut", name)) as f:
        return json.load(f)


def test_bench_writes_a_valid_lut(cli, bundle):
    code, out, err = cli("bench", bundle, "--runs", 3, "--warmup", 1, "--batch", "1,2", "--configs", "0,3,70")
    assert code == 0, err
    lut = read_lut(bundle)
    assert lut["format"] == FORMAT and lut["version"] == VERSION
    assert os.path.exists(os.path.join(bundle, "lut", lut["device_key"] + ".json"))
    assert lut["device_key"].startswith("cpu-") and "-ort" in lut["device_key"] and lut["device_key"].endswith("-fp32")
    assert lut["measured"]["runs"] == 3 and lut["measured"]["warmup"] == 1 and lut["measured"]["batches"] == [1, 2]
    assert lut["device"]["threads"] >= 1 and "perf_counter" in lut["measured"]["timer"]
    assert set(lut["latency"]) == {"1", "2"}
    for batch, rows in lut["latency"].items():
        assert set(rows) == {"0", "3", "70"}
        for e in rows.values():
            assert 0 < e["p50_ms"] <= e["p90_ms"] <= e["p99_ms"] and e["throughput"] > 0 and e["predicted"] is False
    assert f"wrote {os.path.join(bundle, 'lut', lut['device_key'] + '.json')}" in out
    assert load_bundle(str(bundle), check_hashes=True)  # a LUT does not disturb the bundle's integrity
    code, _, err = cli("bench", bundle, "--runs", 1, "--warmup", 0, "--configs", "0", "--quiet")
    assert code == 0 and "replaced the table measured earlier at batch 2" in err and "(--batch 1,2)" in err, err


def test_a_runtime_selects_from_the_table_its_bench_wrote(bundle):
    """bench replaces the device's table as a whole; the runtime it measured must not keep the old one."""
    rt = sc.Runtime(str(bundle), preload=False)
    write_lut(bundle, key=rt.device_key)
    assert rt.select(budget_ms=100) in LATENCY  # from the hand-written table of batch 1
    lut = bench(rt, batches=(2,), runs=1, warmup=0, configs="0,3")
    assert rt.lut is lut and lut.batches == [2]
    assert rt.select(budget_ms=1e6, batch=2) in (0, 3)
    with pytest.raises(sc.StitchError, match="no entries for batch 1"):
        rt.select(budget_ms=100)


def test_a_re_export_keeps_accuracy_and_the_tables_of_the_same_graphs(v1_net, tmp_path):
    """Adding a target keeps both; other configs keep only accuracy, which hours of eval bought."""
    out, said = str(tmp_path / "b"), []
    export(v1_net, out, targets="onnx", configs=[0, 3, 20])
    write_lut(out, latency={0: 2.0, 3: 3.0, 20: 5.0})
    graphs = sc.Runtime(out, preload=False, mode="graphs").device_key  # measured on the onnx graphs ...
    write_lut(out, latency={0: 2.0, 3: 3.0, 20: 5.0}, key=graphs, device={"backend": "ort", "target": "onnx"})
    set_accuracy(out, {0: 70.0, 20: 79.5})
    os.remove(os.path.join(out, "results.txt"))
    os.mkfifo(os.path.join(out, "lut", "pipe.json"))  # never read: it would block
    measuring = sc.Runtime(out, preload=False, mode="graphs")  # a bench of the onnx graphs, still running
    export(v1_net, out, targets="onnx,ort", configs=[0, 3, 20], report=said.append)
    with pytest.raises(sc.StitchError, match="exported again while bench ran"):  # graphs mode now runs ort's
        bench(measuring, batches=(1,), runs=1, warmup=0, configs="0")
    rt = sc.Runtime(out, preload=False)
    assert "ort" in rt.bundle.manifest["targets"] and rt.select(budget_ms=10) == 20
    assert said == [f"{out}: kept top-1 of 2 configs and 1 latency tables from the bundle it replaces"]
    assert os.listdir(os.path.join(out, "lut")) == [f"{rt.device_key}.json"]  # ... which ort now replaces
    export(v1_net, out, targets="onnx", configs=[0, 3, 45])
    bundle = load_bundle(out)
    assert {c: e.get("accuracy") for c, e in bundle.configs.items()} == {0: 70.0, 3: None, 45: None}
    assert bundle.manifest["accuracy"]["source"] == "imported from results.txt"
    assert not os.path.exists(os.path.join(out, "lut"))  # measured on other graphs


def test_bench_refuses_to_write_into_a_bundle_exported_again_meanwhile(bundle, v1_net):
    rt = sc.Runtime(str(bundle))
    export(v1_net, str(bundle), targets="onnx", configs=[0, 3])  # another process's export, say
    with pytest.raises(sc.StitchError, match="exported again while bench ran"):
        bench(rt, batches=(1,), runs=1, warmup=0, configs="0,3")
    assert not os.path.exists(bundle / "lut")
    store_accuracy(rt.bundle, {0: 70.0, 1: 75.0}, "an eval of the export before")  # same checkpoint: still true
    assert {c: e.get("accuracy") for c, e in load_bundle(str(bundle)).configs.items()} == {0: 70.0, 3: None}
    manifest = json.loads((bundle / "manifest.json").read_text())  # as if exported from another checkpoint
    manifest["source"]["sha256"] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    before = (bundle / "manifest.json").read_bytes()
    with pytest.raises(sc.StitchError, match="exported again while accuracy ran"):
        store_accuracy(rt.bundle, {0: 70.0}, "an eval of the export before")
    assert (bundle / "manifest.json").read_bytes() == before


def test_bench_predict_flags_predicted_entries_and_reports_the_error(cli, bundle):
    code, out, err = cli("bench", bundle, "--runs", 3, "--warmup", 1, "--predict", "--configs", "0,2,20,45", "--quiet")
    assert code == 0, err
    lut = read_lut(bundle)
    rows = lut["latency"]["1"]
    assert set(rows) == {str(c) for c in SUBSET}
    assert {c for c, e in rows.items() if not e["predicted"]} == {"0", "2", "20", "45"}
    assert all(0 < e["p50_ms"] <= e["p90_ms"] <= e["p99_ms"] for e in rows.values())
    model = lut["prediction"]["1"]
    keys = {k for c in SUBSET for k in load_bundle(str(bundle)).config(c)["route"]}
    assert set(model["segments_p50_ms"]) == keys and model["calibration"] == [0, 2, 20, 45]
    errors = model["error_pct"]
    assert len(errors["configs"]) == 2 and 0 <= errors["median"] <= errors["max"]  # the ends stay in every fit
    assert "5 configs predicted from" in out and "leave-one-out error median" in out


def test_bench_bad_arguments_are_one_line_errors(cli, bundle):
    one_line_error(*cli("bench", bundle, "--configs", "0,999", "--runs", 1)[::2], "unknown config id 999")
    one_line_error(*cli("bench", bundle, "--batch", "0", "--runs", 1)[::2], "batch sizes must be 1 to 4096")
    one_line_error(*cli("bench", bundle, "--batch", "4097", "--runs", 1)[::2], "batch sizes must be 1 to 4096")
    one_line_error(*cli("bench", bundle, "--threads", os.cpu_count() + 1)[::2], f"expected 1 to {os.cpu_count()}")
    assert not os.path.exists(os.path.join(bundle, "lut"))
    (bundle / "lut").write_text("not a folder")  # refused before measuring: the error names the folder
    one_line_error(*cli("bench", bundle, "--configs", "0", "--runs", 1, "--quiet")[::2], "lut is not a folder")
    assert (bundle / "lut").read_text() == "not a folder"
    (bundle / "lut").unlink()
    (bundle / "lut").mkdir()
    (bundle / "lut" / f"{sc.Runtime(str(bundle)).device_key}.json").mkdir()  # the table's own name taken
    one_line_error(*cli("bench", bundle, "--configs", "0", "--runs", 1, "--quiet")[::2], "cannot write the latency table")


def test_a_graph_that_hashes_right_but_is_no_model_is_one_error_line(cli, bundle):
    """The manifest is not hashed: whoever edits a graph can update its sha256 and size there."""
    m = json.loads((bundle / "manifest.json").read_text())
    rel = m["segments"]["stem:0"]["file"]
    (bundle / rel).write_bytes((bundle / rel).read_bytes()[:-40])
    m["files"][rel] = {"sha256": sha256_file(str(bundle / rel)), "bytes": (bundle / rel).stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(m))
    one_line_error(*cli("bench", bundle, "--configs", "0", "--runs", 1, "--quiet")[::2], "ONNX Runtime cannot load it",
                   "re-export")


def test_a_bundle_replaced_under_a_lazy_runtime_is_one_error_line(bundle, images):
    """Sessions open on first use; a re-export may have removed the graphs since the load."""
    rt = sc.Runtime(str(bundle), preload=False)
    for name in os.listdir(bundle / "onnx"):
        if name.startswith("segment_"):
            os.remove(bundle / "onnx" / name)
    with pytest.raises(sc.StitchError, match="the bundle changed while in use, load it again"):
        rt.run(images, 0)


def test_check_hashes_refuses_a_changed_byte_a_plain_load_cannot_see(bundle, images):
    path = bundle / "onnx" / "weights.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 tells
    path.write_bytes(bytes(data))
    sc.Runtime(str(bundle), preload=False)
    with pytest.raises(sc.StitchError, match="weights.bin"):
        sc.Runtime(str(bundle), preload=False, check_hashes=True)
    with pytest.raises(sc.StitchError, match="weights.bin"):
        sc.Runtime(load_bundle(str(bundle)), preload=False, check_hashes=True)


def test_weights_emptied_under_a_lazy_runtime_are_one_error_line(bundle, images):
    """Written over in place (not replaced by a rename, as export does) before the first use."""
    rt = sc.Runtime(str(bundle), preload=False)
    os.truncate(bundle / "onnx" / "weights.bin", 0)
    with pytest.raises(sc.StitchError, match="cannot map weight file 'weights.bin'.*the bundle is damaged"):
        rt.run(images, 0)


def test_graphs_opened_after_a_re_export_never_read_the_old_weights(bundle, v1_net, images, reference):
    """The new graphs' offsets point into the new weights.bin, not the one this runtime mapped."""
    for mode in ("segments", "graphs"):
        rt = sc.Runtime(str(bundle), preload=False, mode=mode)
        assert rel_err(rt.run(images, 0), reference[0]) < 1e-4  # maps the weights
        export(v1_net, str(bundle), targets="onnx,ort", configs=[0, 20] if mode == "segments" else [0, 20, 45])
        with pytest.raises(sc.StitchError, match=r"the bundle changed while in use \(weights.*was replaced\)"):
            rt.run(images, 20)


# --- select ----------------------------------------------------------------------------------

LATENCY = {0: 2.0, 1: 6.0, 2: 12.0, 3: 3.0, 20: 5.0, 36: 4.0, 37: 8.0, 45: 9.0, 70: 10.0}


def write_lut(bundle_dir, latency=LATENCY, predicted=(), key=None, **overrides) -> str:
    """A hand-written LUT for this machine's device key (select tests must be deterministic)."""
    key = key or sc.Runtime(str(bundle_dir), preload=False).device_key
    rows = {str(c): {"p50_ms": ms, "p90_ms": ms * 1.1, "p99_ms": ms * 1.2, "throughput": 1000 / ms,
                     "predicted": c in predicted} for c, ms in latency.items()}
    data = {"format": FORMAT, "version": VERSION, "device_key": key,
            "device": {"backend": "ort", "backend_version": "x", "threads": 2, "precision": "fp32"},
            "bundle": {"source_sha256": load_bundle(str(bundle_dir)).manifest["source"]["sha256"]},
            "measured": {"timer": "hand-written", "warmup": 0, "runs": 1, "batches": [1]},
            "latency": {"1": rows}, "prediction": None, **overrides}
    os.makedirs(os.path.join(bundle_dir, "lut"), exist_ok=True)
    path = os.path.join(bundle_dir, "lut", key + ".json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def set_accuracy(bundle_dir, accuracy: dict[int, float]) -> None:
    with open(os.path.join(bundle_dir, "results.txt"), "w") as f:
        f.writelines(json.dumps({"cfg_id": c, "acc1": a}) + "\n" for c, a in accuracy.items())
    import_results(str(bundle_dir), os.path.join(bundle_dir, "results.txt"))


def test_select_picks_the_most_accurate_config_within_budget(cli, bundle):
    write_lut(bundle, predicted=(20,))
    set_accuracy(bundle, {0: 70.0, 1: 78.0, 2: 81.0, 3: 71.0, 20: 79.5, 36: 72.0, 37: 79.0, 45: 80.0, 70: 80.5})
    rt = sc.Runtime(str(bundle), preload=False)
    assert rt.select(budget_ms=5.5) == 20  # 79.5 beats 1 (78.0, over budget anyway) and 36
    assert rt.select(budget_ms=9.5) == 45
    assert rt.select(budget_ms=100) == 2
    assert rt.select(budget_ms=2.0) == 0  # the budget is inclusive
    for not_a_batch in (True, 1.0, "1"):  # batch sizes are integers, as config ids are
        with pytest.raises(sc.StitchError, match=f"no entries for batch {not_a_batch!r}"):
            rt.select(budget_ms=100, batch=not_a_batch)
    code, out, err = cli("select", bundle, "--budget-ms", 5.5)
    assert code == 0, err
    assert out.startswith("config 20: 5.000 ms p50") and "(predicted)" in out and "top-1 79.50%" in out
    assert rt.select(budget_ms=11) == 70
    code, out, _ = cli("select", bundle, "--budget-ms", 11, "--metric", "p99", "--json")
    report = json.loads(out)
    assert report["selected"]["id"] == 45 and report["quality"] == "accuracy"  # p99 = 1.2 x p50: 70 no longer fits
    assert [c["id"] for c in report["frontier"]] == [0, 3, 36, 20, 45, 70, 2]
    assert report["frontier"][3]["predicted"] is True


def test_select_breaks_accuracy_ties_by_speed(bundle):
    """Equal accuracy: the faster config wins, not the one with more FLOPs, and lies on the frontier."""
    write_lut(bundle)
    set_accuracy(bundle, {c: 80.0 for c in LATENCY})
    rt = sc.Runtime(str(bundle), preload=False)
    assert rt.bundle.configs[2]["flops"] > rt.bundle.configs[0]["flops"]
    assert rt.select(budget_ms=100) == 0
    assert [c.id for c in rt.selector().frontier()] == [0]


def test_select_without_accuracy_takes_the_most_flops(bundle):
    write_lut(bundle)
    rt = sc.Runtime(str(bundle), preload=False)
    configs = rt.bundle.configs
    for budget in (2.5, 5.5, 9.5, 100):
        fits = [c for c, ms in LATENCY.items() if ms <= budget]
        assert rt.select(budget) == max(fits, key=lambda c: configs[c]["flops"])
    assert rt.selector().quality == "flops"


def test_select_errors_are_one_clear_line(cli, bundle):
    one_line_error(*cli("select", bundle, "--budget-ms", 10)[::2], "no latency table", "stitch-compile bench")
    write_lut(bundle, predicted=(0,))
    one_line_error(*cli("select", bundle, "--budget-ms", 1.5)[::2], "no config fits 1.5 ms", "config 0",
                   "2.000 ms (predicted)")
    one_line_error(*cli("select", bundle, "--budget-ms", -1)[::2], "budget")
    one_line_error(*cli("select", bundle, "--budget-ms", 10, "--batch", 8)[::2], "no entries for batch 8",
                   "or pass --batch 1")
    if (os.cpu_count() or 1) > 1:  # a table measured with 1 thread: the error names --threads 1
        shutil.rmtree(bundle / "lut")
        write_lut(bundle, key=sc.Runtime(str(bundle), preload=False, threads=1).device_key)
        one_line_error(*cli("select", bundle, "--budget-ms", 10, "--threads", 2)[::2], "no latency table",
                       "or pass --threads 1 to use the table already measured with it")
        assert cli("select", bundle, "--budget-ms", 10, "--threads", 1)[0] == 0


@pytest.mark.parametrize("tamper, needle", [
    (lambda d: d["latency"]["1"].update({"999": d["latency"]["1"]["0"]}), "config 999"),
    (lambda d: d["latency"]["1"]["3"].update(p90_ms=0.5), "p50 <= p90 <= p99"),
    (lambda d: d["latency"]["1"]["3"].update(p50_ms=-1), "invalid latency table"),
    (lambda d: d["latency"]["1"]["3"].update(p99_ms=float("nan")), "corrupt latency table"),
    (lambda d: d.update(device_key="cpu-other"), "names device"),
    (lambda d: d["bundle"].update(source_sha256="0" * 64), "another export"),
    (lambda d: d.pop("measured"), "invalid latency table"),
])
def test_a_tampered_lut_is_one_error_line(cli, bundle, tamper, needle):
    path = write_lut(bundle)
    with open(path) as f:
        data = json.load(f)
    tamper(data)
    with open(path, "w") as f:
        json.dump(data, f)
    threads = sc.Runtime(str(bundle), preload=False).threads  # the fix names the table's own bench
    one_line_error(*cli("select", bundle, "--budget-ms", 10)[::2], needle,
                   f"re-run `stitch-compile bench {bundle} --device cpu --threads {threads}`")
    one_line_error(*cli("verify", bundle)[::2], needle)  # LUTs are not hashed: verify checks them as select does


@pytest.mark.parametrize("device, engine, flags", [
    ("cpu", "ort1.32", []), ("cpu", "ort1.32-graphs", ["--mode", "graphs"]),
    ("cpu", "aoti2.14", ["--backend", "aoti"]), ("cuda", "aoti2.14-graphs", ["--backend", "aoti", "--cuda-graphs"])])
def test_a_tables_bench_options_are_read_back_from_its_key(device, engine, flags):
    """verify, which has no runtime, names the bench that re-measures a broken table from its key."""
    from stitch_compile.runtime.device import bench_options, device_key
    key = device_key(device, "Intel(R) Xeon(R) Platinum 8480C-t7 v2", engine, 12, "fp32")
    assert bench_options(key) == ["--device", device, "--threads", "12", *flags]


def test_suggested_commands_quote_a_bundle_path_for_the_shell(cli, bundle, tmp_path):
    spaced = tmp_path / "my models" / "bündle 1"
    shutil.copytree(bundle, spaced)
    code, _, err = cli("select", spaced, "--budget-ms", 10)
    suggested = err.split("`")[1]
    assert code == 2 and shlex.split(suggested)[:3] == ["stitch-compile", "bench", str(spaced)], err


# --- accuracy and plot ---------------------------------------------------------------------

def test_accuracy_from_results_file_goes_into_the_manifest(cli, bundle):
    before = load_bundle(str(bundle)).manifest["files"]
    path = os.path.join(bundle, "stitches_res.txt")
    with open(path, "w") as f:
        f.write(json.dumps({"cfg_id": 3, "acc1": 72.1, "acc5": 91.0, "flops": 1}) + "\n\n")
        f.write(json.dumps({"cfg_id": 70, "acc1": 80.0}) + "\n")
        f.write(json.dumps({"cfg_id": 3, "acc1": 72.5}) + "\n")  # re-evaluated: the later line wins
    code, out, err = cli("accuracy", bundle, "--from", path)
    assert code == 0, err
    assert "top-1 of 2 configs imported" in out
    b = load_bundle(str(bundle), check_hashes=True)
    assert b.config(3)["accuracy"] == 72.5 and b.config(70)["accuracy"] == 80.0 and "accuracy" not in b.config(0)
    assert b.manifest["files"] == before


@pytest.mark.parametrize("line, needle", [
    ("{not json", "results.txt:2: not a JSON object"),
    ('{"cfg_id": 5, "acc1": 70}', "results.txt:2: cfg_id 5 is not a config"),
    ('{"cfg_id": 3}', "results.txt:2: expected a JSON object with 'cfg_id' and 'acc1'"),
    ('{"cfg_id": 3, "acc1": 170}', "results.txt:2: acc1 170"),
    ("[" * 100_000, "results.txt:2: not a JSON object"),
    ('{"cfg_id": 3, "acc1": ' + "9" * 5000 + "}", "results.txt:2: not a JSON object"),
])
def test_a_bad_results_line_is_named_and_nothing_is_written(cli, bundle, line, needle):
    path = os.path.join(bundle, "results.txt")
    with open(path, "w") as f:
        f.write(json.dumps({"cfg_id": 0, "acc1": 70.0}) + "\n" + line + "\n")
    with open(os.path.join(bundle, "manifest.json"), "rb") as f:
        before = f.read()
    one_line_error(*cli("accuracy", bundle, "--from", path)[::2], needle)
    with open(os.path.join(bundle, "manifest.json"), "rb") as f:
        assert f.read() == before


def make_image_folder(root, per_class=3):
    from PIL import Image

    rng = np.random.default_rng(1)
    for label in ("cat", "dog"):
        os.makedirs(root / label)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(40 + 3 * i, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def test_accuracy_eval_measures_top1_of_every_config(cli, bundle, v1_net, tmp_path):
    folder = make_image_folder(tmp_path / "images")
    code, out, err = cli("accuracy", bundle, "--eval", folder, "--batch", 4, "--quiet")
    assert code == 0, err
    x = np.stack([load_image(str(folder / c / f"{i}.png"), (32, 32), 0.875, True)
                  for c in ("cat", "dog") for i in range(3)])
    labels = np.array([0, 0, 0, 1, 1, 1])
    b = load_bundle(str(bundle))
    for cid in SUBSET:
        with torch.no_grad():
            expected = 100 * float((v1_net(torch.from_numpy(x), cid).numpy().argmax(1) == labels).mean())
        assert b.config(cid)["accuracy"] == pytest.approx(expected, abs=1e-3), cid
    one_line_error(*cli("accuracy", bundle)[::2], "exactly one of --from")
    one_line_error(*cli("accuracy", bundle, "--eval", tmp_path)[::2], "no images found")
    one_line_error(*cli("accuracy", bundle, "--eval", folder, "--crop-pct", 1e-6, "--quiet")[::2], "crop_pct 1e-06")
    os.mkfifo(folder / "dog" / "pipe.png")  # reading it would block forever
    one_line_error(*cli("accuracy", bundle, "--eval", folder, "--quiet")[::2], "pipe.png: not a regular file")
    one_line_error(*cli("accuracy", bundle, "--from", folder / "dog" / "pipe.png")[::2], "not a regular file")
    os.symlink(tmp_path / "moved", folder / "bird")  # would shift "cat" and "dog" by one label
    one_line_error(*cli("accuracy", bundle, "--eval", folder, "--quiet")[::2], "bird: broken link")


def test_budgets_beyond_any_float_are_one_error(bundle):
    write_lut(bundle)
    rt = sc.Runtime(str(bundle), preload=False)
    for budget in (10**400, float("nan"), None):
        with pytest.raises(sc.StitchError, match="expected a positive, finite number"):
            rt.selector().select(budget)


def test_eval_preprocessing_without_normalisation_is_plain_pixels(runtime, tmp_path):
    folder = make_image_folder(tmp_path / "images", per_class=1)
    img = load_image(str(folder / "cat" / "0.png"), (32, 32), 1.0, False)
    assert img.shape == (3, 32, 32) and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1
    top1 = evaluate(runtime, str(folder), batch=1, normalize=False)
    assert set(top1) == set(SUBSET) and all(v in (0.0, 50.0, 100.0) for v in top1.values())


def test_plot_writes_a_png(cli, bundle, tmp_path):
    write_lut(bundle, predicted=(20, 45))
    out = tmp_path / "pareto.png"
    code, stdout, err = cli("plot", bundle, "-o", out)
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one_line_error(*cli("plot", bundle, "-o", tmp_path / "f.png", "--x", "flops")[::2], "no accuracy")
    set_accuracy(bundle, {c: 70.0 + i for i, c in enumerate(SUBSET)})
    for x in ("flops", "latency"):
        code, _, err = cli("plot", bundle, "-o", tmp_path / f"{x}.png", "--x", x)
        assert code == 0 and (tmp_path / f"{x}.png").stat().st_size > 1000, err
    (tmp_path / "link.png").symlink_to(tmp_path / "gone" / "p.png")  # a link into a missing folder
    one_line_error(*cli("plot", bundle, "-o", tmp_path / "link.png")[::2], "gone does not exist")


def test_plot_never_writes_over_the_bundle(cli, bundle):
    lut = write_lut(bundle)
    own = [bundle / "manifest.json", bundle / "parity.json", lut, bundle / "lut" / "new.png"]
    before = {p: p.read_bytes() for p in map(Path, own[:3])}
    for out in own:
        one_line_error(*cli("plot", bundle, "-o", out, "--x", "flops")[::2], "is one of the bundle's own files")
    assert {p: p.read_bytes() for p in before} == before
    one_line_error(*cli("plot", bundle, "-o", "")[::2], "expected the name of a PNG file")
    checkpoint = bundle.parent / "snnet.pth"
    checkpoint.write_bytes(b"PK\x03\x04 not a picture")
    one_line_error(*cli("plot", bundle, "-o", checkpoint)[::2], "exists and is not a PNG")
    assert checkpoint.read_bytes() == b"PK\x03\x04 not a picture"
    code, _, err = cli("plot", bundle, "-o", bundle / "pareto.png")  # beside the bundle's files is fine
    assert code == 0, err
    assert load_bundle(str(bundle), check_hashes=True)


@pytest.mark.slow
def test_all_71_configs_resident_equal_pytorch(v1_net, tmp_path, images):
    bundle = export(v1_net, str(tmp_path / "all"), targets="onnx")
    rt = sc.Runtime(bundle)
    with torch.no_grad():
        for cid in range(71):
            assert rel_err(rt.run(images, cid), v1_net(torch.from_numpy(images), cid).numpy()) < 1e-4, cid
