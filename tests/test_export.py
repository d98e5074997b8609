"""Export: one graph per config over one weight store, parity-checked, atomic, verifiable."""

from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import stitch_compile as sc
import stitch_compile.bundle as bundle_module
from stitch_compile.bundle import held_signals, load_bundle, sha256_file
from cli_runner import run_cli
from stitch_compile.export import export
from stitch_compile.export.targets import KNOWN, unavailable_reason
from stitch_compile.export.weights import ALIGN

SUBSET = [0, 1, 2, 3, 8, 36, 37, 52, 70]


@pytest.fixture(scope="module")
def v1_bundle(v1_net, tmp_path_factory):
    """Anchors and stitched configs of both pairs (all 71: see the slow test), onnx target."""
    out = tmp_path_factory.mktemp("export") / "bundle"
    return export(v1_net, str(out), targets="onnx", configs=SUBSET)


def external_refs(model: onnx.ModelProto):
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t.name, {e.key: e.value for e in t.external_data}


@pytest.mark.slow
def test_all_71_configs_export_within_the_size_bound_with_parity(v1_net, tmp_path):
    bundle = export(v1_net, str(tmp_path / "all"), targets="onnx,ort")
    assert sorted(bundle.configs) == list(range(71))
    assert_size_bound(bundle, skip=".ort.")
    with open(bundle.path("parity.json")) as f:
        parity = json.load(f)["targets"]
    assert {t: set(v) for t, v in parity.items()} == {t: {str(i) for i in range(71)} for t in ("onnx", "ort")}


def test_every_config_runs_in_a_plain_session_with_dynamic_batch(v1_net, v1_bundle):
    assert sorted(v1_bundle.configs) == SUBSET
    for cid in (0, 3, 37, 70):
        session = ort.InferenceSession(v1_bundle.graph("onnx", cid), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["image"]
        assert [o.name for o in session.get_outputs()] == ["logits"]
        for batch in (1, 3):
            x = np.random.default_rng().standard_normal((batch, 3, 32, 32), dtype=np.float32)
            got = session.run(["logits"], {"image": x})[0]
            with torch.no_grad():
                ref = v1_net(torch.from_numpy(x), cid).numpy()
            assert got.shape == (batch, 10)
            assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_weights_are_stored_once_and_aligned(v1_ckpt, v1_bundle):
    _, state = v1_ckpt
    onnx_dir = os.path.join(v1_bundle.root, "onnx")
    slots = set()
    for name in os.listdir(onnx_dir):
        if not name.endswith(".onnx"):
            continue
        model = onnx.load(os.path.join(onnx_dir, name), load_external_data=False)
        assert not [t.name for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL
                    and len(t.raw_data) > 64], f"{name} embeds weights"
        for _, ref in external_refs(model):
            assert ref["location"] == "weights.bin"
            offset, length = int(ref["offset"]), int(ref["length"])
            assert length < ALIGN or offset % ALIGN == 0
            slots.add((offset, length))
    ckpt_bytes = sum(t.numel() * t.element_size() for t in state.values())
    stored = sum(length for _, length in slots)
    assert stored == v1_bundle.manifest["weights"]["unique_bytes"]
    assert stored <= ckpt_bytes  # every checkpoint tensor at most once
    intervals = sorted(slots)
    assert all(a[0] + a[1] <= b[0] for a, b in zip(intervals, intervals[1:])), "slots overlap"


def assert_size_bound(bundle, skip: str = "\0") -> None:
    """Graphs cost < 100 KB per config; the store pads only tensors of >= 64 KiB, to 64 KiB.

    (The issue's 1.02 x unique bytes holds for DeiT-sized tensors: benchmarks/export.py prints
    it. These test anchors are so narrow that alignment padding alone is ~2% of their store.)
    """
    manifest = bundle.manifest
    files = {rel: meta["bytes"] for rel, meta in manifest["files"].items() if skip not in rel}
    graphs = sum(size for rel, size in files.items() if rel.endswith(".onnx"))
    assert graphs <= 100_000 * len(manifest["configs"])
    large = sum(int(ref["length"]) >= ALIGN for seg in manifest["segments"].values()
                for _, ref in external_refs(onnx.load(bundle.path(seg["file"]), load_external_data=False)))
    assert files["onnx/weights.bin"] <= manifest["weights"]["unique_bytes"] + ALIGN * large


def test_bundle_size_bound(v1_bundle):
    assert_size_bound(v1_bundle)


def test_each_unique_segment_traced_once(v1_net, tmp_path, monkeypatch):
    traced = []
    export_pkg = importlib.import_module("stitch_compile.export")  # the package: sc.export is the function
    real = export_pkg.trace_segment
    monkeypatch.setattr(export_pkg, "trace_segment", lambda seg, opset: traced.append(seg.key) or real(seg, opset))
    bundle = export(v1_net, str(tmp_path / "b"), targets="onnx", configs=SUBSET)
    wanted = {k for cid in SUBSET for k in v1_net.configs[cid].route}
    assert sorted(traced) == sorted(wanted)
    assert set(bundle.manifest["segments"]) == wanted


def test_parity_recorded_for_every_config(v1_bundle):
    with open(os.path.join(v1_bundle.root, "parity.json")) as f:
        parity = json.load(f)
    entries = parity["targets"]["onnx"]
    assert set(entries) == {str(i) for i in SUBSET}
    for entry in entries.values():
        assert set(entry) == {"batch_1", "batch_4"}
        assert all(0 <= v["max_rel"] <= 1e-4 for v in entry.values())


def test_parity_reference_is_shared_by_targets(v1_net):
    """Every target sees the same inputs per (config, batch) and one eager forward per pair; a
    fresh seed gives other inputs, and a wrong graph shows as a relative error."""
    from stitch_compile.export.parity import Reference, compare

    ref = Reference(v1_net, seed=7)
    x = ref.inputs(3, 4)
    assert x.shape == (4, *v1_net.input_shape)
    assert np.array_equal(x, Reference(v1_net, seed=7).inputs(3, 4))
    assert not np.array_equal(x[:1], ref.inputs(3, 1)) and not np.array_equal(x, ref.inputs(4, 4))
    assert not np.array_equal(x, Reference(v1_net).inputs(3, 4))
    with torch.no_grad():
        np.testing.assert_array_equal(ref.logits(3, 4), v1_net(torch.from_numpy(x), 3).numpy())
    assert ref.logits(3, 4) is ref.logits(3, 4)
    with torch.no_grad():
        exact = compare(ref, 3, lambda a: v1_net(torch.from_numpy(a), 3).numpy())
    assert all(e["max_rel"] == 0 for e in exact.values())
    assert all(e["max_rel"] == 1 for e in compare(ref, 3, lambda a: np.zeros((len(a), 10), np.float32)).values())


def test_parity_fails_outputs_with_a_nan(v1_net):
    """A NaN compares false with every tolerance, so it is counted as an infinite error."""
    from stitch_compile.export.parity import Reference, compare, within

    ref = Reference(v1_net, seed=7)
    with torch.no_grad():
        results = {"3": compare(ref, 3, lambda a: v1_net(torch.from_numpy(a), 3).numpy())}
    assert within(results, "onnx", 1e-4) is results

    def one_nan(a):
        with torch.no_grad():
            y = v1_net(torch.from_numpy(a), 4).numpy()
        y[-1, -1] = np.nan
        return y

    results["4"] = compare(ref, 4, one_nan)
    with pytest.raises(sc.StitchError, match="configs 4 .*relative error inf"):
        within(results, "onnx", 1e-4)


def test_parity_refuses_weights_whose_own_logits_overflow(tmp_path):
    """Finite weights can still overflow float32: then no export can be checked against PyTorch."""
    from snnet_reference import v1_state, save_public

    path = tmp_path / "huge.pth"
    save_public(path, {k: v * 1e30 for k, v in v1_state(depth=2).items()})
    with pytest.raises(sc.StitchError, match="config 0: PyTorch's own logits on random inputs are not finite"):
        export(sc.load(str(path)), str(tmp_path / "b"), configs=[0])
    assert not (tmp_path / "b").exists()


def test_manifest_describes_configs(v1_net, v1_bundle, v1_ckpt):
    m = v1_bundle.manifest
    assert m["family"] == "snnet_v1_vit" and len(m["anchors"]) == 3
    for c in m["configs"]:
        assert c["route"] == list(v1_net.configs[c["id"]].route)
        assert c["flops"] == v1_net.configs[c["id"]].flops
    assert m["source"]["sha256"] == sha256_file(v1_ckpt[0])


def test_ort_target_shares_the_weight_store(v1_net, tmp_path):
    bundle = export(v1_net, str(tmp_path / "b"), targets="onnx,ort", configs=SUBSET)
    ort_target = bundle.manifest["targets"]["ort"]
    assert set(ort_target["graphs"]) == {str(c) for c in SUBSET}
    derived = ort_target["derived_bytes"]
    assert derived <= 0.05 * bundle.manifest["weights"]["unique_bytes"], "optimiser copied weights per config"
    for rel in ort_target["graphs"].values():
        model = onnx.load(bundle.path(rel), load_external_data=False)
        assert {ref["location"] for _, ref in external_refs(model)} <= {"weights.bin", "weights.ort.bin"}
    with open(bundle.path("parity.json")) as f:
        assert set(json.load(f)["targets"]) == {"onnx", "ort"}


def test_v2_lora_configs_export_with_parity(v2_ckpt, tmp_path):
    net = sc.load(v2_ckpt[0])
    bundle = export(net, str(tmp_path / "b"), targets="onnx", configs=[0, 1, 2, 14, 25, 80, 134])
    assert len(bundle.manifest["configs"]) == 7


def test_rerun_reuses_an_up_to_date_bundle(v1_ckpt, tmp_path, capsys):
    out = tmp_path / "b"
    assert run_cli("export", v1_ckpt[0], "--out", out, "--configs", "0,3", "--targets", "onnx", "--quiet") == 0
    stamp = os.path.getmtime(out / "onnx" / "weights.bin")
    assert run_cli("export", v1_ckpt[0], "--out", out, "--configs", "0,3", "--targets", "onnx", "--quiet") == 0
    assert "up to date" in capsys.readouterr().err
    assert os.path.getmtime(out / "onnx" / "weights.bin") == stamp


@pytest.mark.parametrize("options, needle", [
    (["--configs", "0,999"], "unknown config id 999"),
    (["--configs", ","], "--configs ',': no config ids"),
    (["--opset", "99"], "--opset 99: the ONNX exporter writes opsets 7 to 23"),
    (["--opset", "7"], "--opset 7: segment stem:0 cannot be exported at this opset"),
])
def test_failed_export_keeps_the_existing_bundle(v1_ckpt, tmp_path, capsys, options, needle):
    out = tmp_path / "b"
    assert run_cli("export", v1_ckpt[0], "--out", out, "--configs", "0", "--targets", "onnx", "--quiet") == 0
    before = (out / "manifest.json").read_bytes()
    assert run_cli("export", v1_ckpt[0], "--out", out, "--configs", "0", "--quiet", *options) == 2
    assert needle in _one_error_line(capsys)
    assert (out / "manifest.json").read_bytes() == before
    assert [p for p in os.listdir(tmp_path) if "partial" in p] == []


@pytest.mark.parametrize("where", ["file", "under_file", "folder", "foreign_manifest"])
def test_export_refuses_an_out_that_is_not_a_bundle_folder(v1_ckpt, tmp_path, capsys, where):
    """--out naming a file, a path under a file, or a folder of other things (one with a
    manifest.json of its own too): one line, exit 2, and nothing on disk touched."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("mine too")
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "manifest.json").write_text('{"name": "my web app", "files": {}}')
    out = {"file": "notes.txt", "under_file": "notes.txt/b", "folder": "docs", "foreign_manifest": "app"}[where]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert run_cli("export", v1_ckpt[0], "--out", tmp_path / out, "--configs", "0", "--quiet") == 2
    err = _one_error_line(capsys)
    assert "--out" in err or "bundle folder" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_export_keeps_files_the_bundle_does_not_list(v1_ckpt, tmp_path, capsys):
    """Export replaces the bundle folder whole: anything else in it (the checkpoint itself, notes)
    would go with it, so it refuses; LUTs are the bundle's own and may be replaced."""
    out = tmp_path / "b"
    assert run_cli("export", v1_ckpt[0], "--out", out, "--configs", "0", "--targets", "onnx", "--quiet") == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # the bundle follows the umask, not mkdtemp's 0700
    shutil.copy(v1_ckpt[0], out / "snnet.pth")
    (out / "lut").mkdir()
    assert run_cli("export", out / "snnet.pth", "--out", out, "--configs", "3", "--targets", "onnx", "--quiet") == 2
    assert "holds snnet.pth (1 entries the bundle does not list)" in _one_error_line(capsys)
    assert (out / "snnet.pth").read_bytes() == open(v1_ckpt[0], "rb").read()
    (out / "snnet.pth").unlink()
    assert run_cli("export", v1_ckpt[0], "--out", out, "--configs", "3", "--targets", "onnx", "--quiet") == 0


def test_export_through_a_symlinked_out_fills_the_folder_it_points_to(v1_ckpt, tmp_path):
    """--out on a link (to a bigger disk, say): the link stays, the bundle lands where it points."""
    (tmp_path / "disk").mkdir()
    (tmp_path / "b").symlink_to(tmp_path / "disk")
    for configs in ("0", "3"):  # a new bundle, then one that replaces it
        assert run_cli("export", v1_ckpt[0], "--out", tmp_path / "b", "--configs", configs, "--targets", "onnx",
                       "--quiet") == 0
        assert (tmp_path / "b").is_symlink()
        assert [c["id"] for c in load_bundle(str(tmp_path / "disk")).manifest["configs"]] == [int(configs)]
    assert sorted(os.listdir(tmp_path)) == ["b", "disk"]


def test_interrupted_export_never_leaves_a_bundle_that_looks_whole(v1_ckpt, tmp_path):
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "stitch_compile.cli", "export", str(v1_ckpt[0]),
                             "--out", str(out), "--quiet"], stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=8)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert not out.exists() or load_bundle(str(out), check_hashes=True)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sigterm_during_export_cleans_up_and_keeps_the_bundle(v1_ckpt, tmp_path):
    """SIGTERM (a service stopped, a CI timeout) cleans up as Ctrl-C does: no partial folder left."""
    out = tmp_path / "b"
    assert run_cli("export", v1_ckpt[0], "--out", out, "--configs", "0", "--targets", "onnx", "--quiet") == 0
    before = (out / "manifest.json").read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "stitch_compile.cli", "export", str(v1_ckpt[0]), "--out", str(out),
                             "--quiet"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(n.startswith(".b.partial-") for n in os.listdir(tmp_path)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.splitlines() == ["terminated"], err
    assert os.listdir(tmp_path) == ["b"] and (out / "manifest.json").read_bytes() == before
    load_bundle(str(out), check_hashes=True)


def test_the_next_export_clears_what_a_killed_one_left(v1_ckpt, tmp_path, capsys):
    """SIGKILL or a power loss right after the old bundle was moved aside for the swap: the next
    export puts it back (and reuses it) and clears the dead writer's folders; a live one's stay."""
    out = tmp_path / "b"
    assert run_cli("export", v1_ckpt[0], "--out", out, "--configs", "0", "--targets", "onnx", "--quiet") == 0
    before = (out / "manifest.json").read_bytes()
    dead = _dead_pid()
    aside = tmp_path / f".b.old-{dead}-{'a' * 12}"
    aside.mkdir()
    os.replace(out, aside / "bundle")
    (tmp_path / f".b.partial-{dead}-{'b' * 12}" / "onnx").mkdir(parents=True)
    live = tmp_path / f".b.partial-{os.getpid()}-{'c' * 12}"  # an export still running
    live.mkdir()
    assert run_cli("export", v1_ckpt[0], "--out", out, "--configs", "0", "--targets", "onnx", "--quiet") == 0
    assert "up to date" in capsys.readouterr().err and (out / "manifest.json").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == sorted(["b", live.name])
    (out / f".manifest.json.tmp-{dead}-{'d' * 12}").write_text("{")  # a dead accuracy's temporary file
    assert run_cli("export", v1_ckpt[0], "--out", out, "--configs", "3", "--targets", "onnx", "--quiet") == 0
    assert f".manifest.json.tmp-{dead}-{'d' * 12}" not in os.listdir(out)


def test_held_signals_deliver_ctrl_c_after_the_block():
    previous, done = signal.getsignal(signal.SIGINT), []
    with pytest.raises(KeyboardInterrupt):
        with held_signals():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # Python runs handlers between bytecodes: here, were it not held
            done.append(True)
    assert done == [True] and signal.getsignal(signal.SIGINT) is previous


def test_ctrl_c_held_over_the_swap_arrives_after_it_with_nothing_left_aside(tmp_path, monkeypatch):
    out, replace = tmp_path / "b", os.replace
    out.mkdir()
    (out / "old.txt").write_text("old")

    def replace_then_interrupt(src, dst):  # Ctrl-C right after the old bundle was moved aside
        replace(src, dst)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    monkeypatch.setattr(bundle_module.os, "replace", replace_then_interrupt)
    monkeypatch.setattr(bundle_module, "check_replaceable", lambda _out: None)
    with pytest.raises(KeyboardInterrupt):
        with bundle_module.staging(str(out)) as tmp:
            open(os.path.join(tmp, "new.txt"), "w").close()
    assert os.listdir(tmp_path) == ["b"] and os.listdir(out) == ["new.txt"]


@pytest.mark.parametrize("interrupted", [False, True])
def test_a_swap_that_fails_midway_puts_the_old_bundle_back(tmp_path, monkeypatch, interrupted):
    """Even with a Ctrl-C arriving in the middle: the roll-back is held like the swap."""
    out, replace, calls = tmp_path / "b", os.replace, []
    out.mkdir()
    (out / "old.txt").write_text("old")

    def second_fails(src, dst):  # the old bundle moved aside, then the new one cannot move in
        calls.append(dst)
        if len(calls) == 2:
            if interrupted:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        replace(src, dst)
    monkeypatch.setattr(bundle_module.os, "replace", second_fails)
    monkeypatch.setattr(bundle_module, "check_replaceable", lambda _out: None)
    with pytest.raises(KeyboardInterrupt if interrupted else sc.StitchError):
        with bundle_module.staging(str(out)) as tmp:
            open(os.path.join(tmp, "new.txt"), "w").close()
    assert len(calls) == 3 and os.listdir(tmp_path) == ["b"] and os.listdir(out) == ["old.txt"]


def test_leftover_names_never_follow_links_nor_crash(tmp_path):
    """Names shaped like a dead writer's leftovers: a link is removed, never followed (its target
    stays where it is), and a pid no process can have is simply dead."""
    victim = tmp_path / "victim"
    (victim / "bundle").mkdir(parents=True)
    (victim / "bundle" / "data.txt").write_text("mine")
    work = tmp_path / "work"
    work.mkdir()
    (work / f".b.old-{_dead_pid()}-{'a' * 12}").symlink_to(victim)
    (work / f".p.png.tmp-9999999999-{'b' * 12}").write_text("")
    (work / f".p.png.tmp-{'9' * 20}-{'c' * 12}").write_text("")  # not a pid at all: left alone
    bundle_module.clear_leftovers(str(work), "b")
    bundle_module.clear_leftovers(str(work), "p.png")
    assert os.listdir(work) == [f".p.png.tmp-{'9' * 20}-{'c' * 12}"]
    assert (victim / "bundle" / "data.txt").read_text() == "mine"


def test_an_out_that_is_a_loop_of_links_is_refused_before_compiling(v1_ckpt, tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert run_cli("export", v1_ckpt[0], "--out", tmp_path / "a", "--configs", "0", "--quiet") == 2
    assert "a loop of symbolic links" in _one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_targets_all_builds_what_this_machine_can_and_skips_the_rest(v1_ckpt, tmp_path, capsys):
    assert run_cli("export", v1_ckpt[0], "--out", tmp_path / "a", "--configs", "0", "--targets", "all", "--quiet") == 0
    err = capsys.readouterr().err
    built = set(load_bundle(str(tmp_path / "a")).manifest["targets"])
    for target in KNOWN:
        reason = unavailable_reason(target)
        assert (target in built) == (reason is None) and (f"{target}: skipped" in err) == (reason is not None)
    if unavailable_reason("tensorrt"):  # ... with how to get tensorrt/build.sh all the same
        assert "name it in --targets" in err and not (tmp_path / "a" / "tensorrt").exists()
    if not torch.cuda.is_available():  # naming a device it cannot build for fails and writes nothing
        assert run_cli("export", v1_ckpt[0], "--out", tmp_path / "t", "--configs", "0", "--targets", "aoti",
                       "--device", "cuda", "--quiet") == 2
        assert "no CUDA GPU" in capsys.readouterr().err
        assert not (tmp_path / "t").exists()


@pytest.fixture
def copied_bundle(v1_bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(v1_bundle.root, dst)
    return dst


def test_verify_passes_and_reruns_parity(copied_bundle, v1_ckpt, capsys):
    assert run_cli("verify", copied_bundle, "--checkpoint", v1_ckpt[0], "--quiet") == 0
    assert "fresh inputs" in capsys.readouterr().out


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "Traceback" not in err[0]
    return err[0]


def test_verify_catches_a_tampered_graph(copied_bundle, capsys):
    path = copied_bundle / "onnx" / "config_8.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert run_cli("verify", copied_bundle) == 2
    assert "config_8.onnx" in _one_error_line(capsys)


def test_verify_refuses_paths_leaving_the_bundle(copied_bundle, capsys):
    manifest = json.loads((copied_bundle / "manifest.json").read_text())
    manifest["targets"]["onnx"]["graphs"]["0"] = "../outside.onnx"
    (copied_bundle / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli("verify", copied_bundle) == 2
    assert "leaves the bundle" in _one_error_line(capsys)


def test_verify_reports_missing_files_and_corrupt_manifest(copied_bundle, capsys):
    os.unlink(copied_bundle / "onnx" / "config_37.onnx")
    assert run_cli("verify", copied_bundle) == 2
    assert "config_37.onnx" in _one_error_line(capsys)
    (copied_bundle / "manifest.json").write_text("{not json")
    assert run_cli("verify", copied_bundle) == 2
    assert "corrupt manifest" in _one_error_line(capsys)
    (copied_bundle / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    assert run_cli("verify", copied_bundle) == 2
    assert "corrupt manifest (nested too deeply)" in _one_error_line(capsys)


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["configs"][1]["route"].append("block:9:9"), "route names segment 'block:9:9'"),
    (lambda m: m["configs"][1].update(id=m["configs"][0]["id"]), "config id 0 appears twice"),
    (lambda m: m["targets"]["onnx"].update(weights=["/etc/passwd"]), "/etc/passwd"),
    (lambda m: m.update(schema_version="1"), "schema_version '1' is not supported"),
], ids=["unknown-segment", "duplicate-id", "weights-outside", "version-as-string"])
def test_verify_refuses_manifest_edits_the_schema_allows(copied_bundle, capsys, edit, needle):
    """The manifest is not hashed: what the schema cannot express is checked on load."""
    path = copied_bundle / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    for command in ("verify", "inspect"):
        assert run_cli(command, copied_bundle) == 2
        assert needle in _one_error_line(capsys)


def _edit_manifest(bundle_dir, edit) -> dict:
    path = bundle_dir / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    return m


def _unstitched(m: dict) -> dict:
    """A stitched config whose route loses its stitching layer: the next anchor's block then gets
    the previous anchor's width."""
    config = next(c for c in m["configs"] if any(key.startswith("stitch:") for key in c["route"]))
    config["route"] = [key for key in config["route"] if not key.startswith("stitch:")]
    return config


def test_routes_whose_segments_do_not_fit_are_refused(copied_bundle, capsys):
    """The manifest is not hashed. Such a route would fail mid-run in ONNX Runtime (and make an
    AOTInductor package read out of bounds): verify and the runtime refuse it, naming it."""
    edited = {}
    _edit_manifest(copied_bundle, lambda m: edited.update(_unstitched(m)))
    assert run_cli("verify", copied_bundle) == 2
    line = _one_error_line(capsys)
    assert f"config {edited['id']}: segment 'block:" in line and "tampered" in line, line
    with pytest.raises(sc.StitchError, match=f"config {edited['id']}: segment 'block:.* but gets"):
        sc.Runtime(str(copied_bundle))


def test_verify_with_the_checkpoint_refuses_routes_swapped_between_configs(copied_bundle, v1_ckpt, capsys):
    """Swapped routes still fit and every file still hashes right: only the checkpoint can say
    which route each config id runs (parity runs the checkpoint's routes, the runtime the manifest's)."""
    def swap(m):
        m["configs"][0]["route"], m["configs"][1]["route"] = m["configs"][1]["route"], m["configs"][0]["route"]
    _edit_manifest(copied_bundle, swap)
    assert run_cli("verify", copied_bundle, "--checkpoint", v1_ckpt[0], "--quiet") == 2
    assert "config 0 runs another route than the checkpoint's" in _one_error_line(capsys)


@pytest.mark.parametrize("accuracy, needle", [("NaN", "corrupt manifest (NaN is not a JSON number"),
                                              ("101.5", "invalid manifest at configs/3/accuracy")])
def test_load_refuses_accuracy_that_is_no_percentage(copied_bundle, capsys, accuracy, needle):
    """A NaN accuracy would otherwise win every comparison in ``select`` (none replaces it)."""
    path = copied_bundle / "manifest.json"
    m = json.loads(path.read_text())
    m["configs"][3]["accuracy"] = 12.3456789
    path.write_text(json.dumps(m).replace("12.3456789", accuracy))
    assert run_cli("inspect", copied_bundle) == 2
    assert needle in _one_error_line(capsys)


def test_verify_rejects_a_foreign_checkpoint(copied_bundle, tmp_path, capsys):
    from snnet_reference import write_v1

    other = tmp_path / "other.pth"
    write_v1(other, seed=1)
    assert run_cli("verify", copied_bundle, "--checkpoint", other) == 2
    assert "sha256 differs" in _one_error_line(capsys)
