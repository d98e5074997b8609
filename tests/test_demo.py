"""The quick start's CI variant: `stitch-compile demo --fast` end to end (about a minute)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from stitch_compile.bundle import load_bundle
from stitch_compile.demo.pipeline import BATCH


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The real command in a fresh process, as a user runs it: (output folder, stdout lines)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    done = subprocess.run([sys.executable, "-m", "stitch_compile.cli", "demo", "--fast", "--quiet", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out, done.stdout.splitlines()


def test_demo_writes_checkpoint_bundle_lut_and_plot(demo_run):
    out, _ = demo_run
    bundle = load_bundle(str(out / "bundle"), check_hashes=True)
    assert (out / "snnet_digits.pth").is_file()
    assert len(os.listdir(out / "bundle" / "lut")) == 1
    assert all("accuracy" in c for c in bundle.manifest["configs"])
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_prints_every_config_and_fitting_choices(demo_run):
    out, lines = demo_run
    bundle = load_bundle(str(out / "bundle"))
    rows = [line for line in lines if line[:3].strip().isdigit()]
    assert sorted(int(r.split()[0]) for r in rows) == sorted(bundle.configs)
    lut = json.loads(next((out / "bundle" / "lut").iterdir()).read_text())
    latency = {int(cid): e["p50_ms"] for cid, e in lut["latency"][str(BATCH)].items()}
    choices = [line for line in lines if line.startswith("budget ")]
    assert len(choices) == 2
    for line in choices:
        budget, chosen = float(line.split()[1]), int(line.split("config ")[1].split(":")[0])
        assert latency[chosen] <= budget
    assert any(line.startswith("SN-Net effect:") for line in lines)
    suggested = next(line for line in lines if line.startswith("next: "))  # the select it suggests works
    args = shlex.split(suggested[len("next: "):].split(" (")[0])[1:]
    done = subprocess.run([sys.executable, "-m", "stitch_compile.cli", *args], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith(f"config {int(choices[0].split('config ')[1].split(':')[0])}:"), done


def test_wider_anchor_is_more_accurate(demo_run):
    out, _ = demo_run
    configs = load_bundle(str(out / "bundle")).configs
    anchors = sorted((c for c in configs.values() if len(c["anchors"]) == 1), key=lambda c: c["flops"])
    assert anchors[-1]["accuracy"] > anchors[0]["accuracy"]


def test_inspect_marks_the_flops_accuracy_frontier_of_a_bundle(demo_run, capsys):
    from cli_runner import run_cli
    from stitch_compile.model import pareto_frontier

    out, _ = demo_run
    assert run_cli("inspect", out / "bundle", "--json") == 0
    described = json.loads(capsys.readouterr().out)
    points = {c["id"]: (c["flops"], c["accuracy"]) for c in described["configs"]}
    assert described["frontier"] == sorted(pareto_frontier(points))
    anchors = [c["id"] for c in described["configs"] if len(c["anchors"]) == 1]
    cheapest = min(anchors, key=lambda a: points[a][0])
    assert cheapest in described["frontier"]  # nothing is cheaper than the smallest anchor
    assert run_cli("inspect", out / "bundle") == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert {int(r.split()[0]) for r in rows if "*" in r} == set(described["frontier"])


@pytest.mark.parametrize("plant, needle", [
    (lambda out: (out / "snnet_digits.pth").write_text("the user's notes"), "holds snnet_digits.pth"),
    (lambda out: (out / "data.csv").write_text("1,2"), "holds data.csv"),
    (lambda out: ((out / "bundle").mkdir(), (out / "bundle" / "mine.txt").write_text("x")), "exists and is not a bundle"),
], ids=["own-name", "other-file", "bundle-of-other-files"])
def test_demo_refuses_a_folder_of_user_files_before_training(cli, tmp_path, plant, needle):
    """Checked before a minute of training; nothing of the user's is overwritten."""
    out = tmp_path / "mine"
    out.mkdir()
    plant(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, stdout, err = cli("demo", "--fast", "--quiet", "--out", out)
    assert code == 2 and stdout == "" and err.count("\n") == 1 and needle in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_demo_out_may_hold_what_a_killed_demo_left_but_not_a_running_one(tmp_path):
    from stitch_compile import StitchError
    from stitch_compile.demo.pipeline import check_out

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (tmp_path / f".snnet_digits.pth.tmp-{proc.pid}-{'a' * 12}").write_bytes(b"PK")
    (tmp_path / f".bundle.partial-{proc.pid}-{'b' * 12}").mkdir()
    check_out(str(tmp_path))  # the writers are dead: their leftovers are cleared on the way
    (tmp_path / f".pareto.png.tmp-{os.getpid()}-{'c' * 12}").write_bytes(b"")
    with pytest.raises(StitchError, match="holds .pareto.png.tmp-"):
        check_out(str(tmp_path))


def test_demo_out_may_not_be_a_file(cli, tmp_path):
    (tmp_path / "f").write_text("mine")
    code, _, err = cli("demo", "--fast", "--quiet", "--out", tmp_path / "f")
    assert code == 2 and "exists and is not a folder" in err and (tmp_path / "f").read_text() == "mine"
