"""The ``stitch-compile`` command: thin wrappers over the public API.

Bad input raises :class:`StitchError`; ``main`` prints its one line and exits 2 (``--debug``
keeps the traceback). Nothing here holds logic the Python API lacks.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

import click

from . import __version__
from .errors import StitchError
from .bundle import MANIFEST, check_writable, load_bundle
from .model import describe_route, load, pareto_frontier  # light: torch and timm load with a checkpoint


@click.group()
@click.version_option(__version__, prog_name="stitch-compile")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Compile stitchable neural networks (SN-Net family) for deployment."""
    ctx.obj = {"debug": debug}


anchors_option = click.option(
    "--anchors", default=None, metavar="NAMES",
    help="Comma-separated timm model names overriding anchor detection; name:key=value:... sets kwargs.")


@cli.command()
@click.argument("checkpoint", type=click.Path())
@anchors_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def inspect(checkpoint: str, anchors: str | None, as_json: bool) -> None:
    """List every config of CHECKPOINT (or of an exported bundle folder): id, route, GFLOPs, params.

    For a bundle whose manifest holds accuracy, configs on the GFLOPs-accuracy Pareto frontier are
    marked ``*`` (``select --json`` and ``plot`` give the latency frontier of a device).
    """
    if os.path.isfile(os.path.join(checkpoint, MANIFEST)):
        manifest = load_bundle(checkpoint).manifest
        described = {k: manifest[k] for k in ("family", "anchors", "configs")}
    else:
        described = load(checkpoint, anchors=anchors).describe()
    configs = described["configs"]
    with_accuracy = {c["id"]: (c["flops"], c["accuracy"]) for c in configs if "accuracy" in c}
    frontier = set(pareto_frontier(with_accuracy))
    if as_json:
        click.echo(json.dumps({**described, "frontier": sorted(frontier)} if with_accuracy else described))
        return
    names = ", ".join(a["name"] for a in described["anchors"])
    click.echo(f"family {described['family']}, {len(configs)} configs, anchors: {names}")
    click.echo(f"{'id':>4}  {'GFLOPs':>8}  {'params(M)':>9}  {'top-1 %' if with_accuracy else '':>7}  route")
    for c in configs:
        acc = f"{c['accuracy']:>6.2f}{'*' if c['id'] in frontier else ' '}" if "accuracy" in c else " " * 7
        click.echo(f"{c['id']:>4}  {c['flops'] / 1e9:>8.3f}  {c['params'] / 1e6:>9.2f}  {acc}  {describe_route(c['route'])}")


quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")


@cli.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--out", "out", default=None, metavar="DIR", help="Bundle folder [default: CHECKPOINT's name + .bundle].")
@click.option("--targets", default="onnx,ort", show_default=True, help="Comma-separated: onnx, ort, tensorrt, aoti, or 'all'.")
@click.option("--configs", default="all", show_default=True, help="'all' or comma-separated config ids.")
@click.option("--opset", default=17, show_default=True, type=int, help="ONNX opset of the graphs.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]),
              help="tensorrt target: engine precision (fp16 adds fp16 graphs over one fp16 weight store).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="tensorrt target: largest batch of the engines' optimisation profile.")
@click.option("--device", default="cpu", show_default=True,
              help="aoti target: compile for 'cpu' or 'cuda[:N]' (builds for other devices in --out are kept).")
@click.option("--jobs", default=None, type=click.IntRange(min=1),
              help="aoti target: packages compiled in parallel [default: one per two CPUs].")
@anchors_option
@quiet_option
def export(checkpoint: str, out: str | None, targets: str, configs: str, opset: int, precision: str, max_batch: int,
           device: str, jobs: int | None, anchors: str | None, quiet: bool) -> None:
    """Compile every config of CHECKPOINT into a bundle, weights stored once, parity-checked."""
    from .export import export as export_bundle

    net = load(checkpoint, anchors=anchors)
    out = out or os.path.splitext(checkpoint)[0] + ".bundle"
    bundle = export_bundle(net, out, targets=targets, configs=configs, opset=opset, quiet=quiet,
                           report=lambda line: click.echo(line, err=True), precision=precision, max_batch=max_batch,
                           device=device, jobs=jobs)
    m = bundle.manifest
    click.echo(f"{out}: {len(m['configs'])} configs, targets {', '.join(m['targets'])}, "
               f"weights {m['weights']['unique_bytes'] / 1e6:.1f} MB stored once, bundle {_bundle_mb(m):.1f} MB")


def _bundle_mb(manifest: dict) -> float:
    return sum(f["bytes"] for f in manifest["files"].values()) / 1e6


@cli.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--checkpoint", default=None, type=click.Path(dir_okay=False),
              help="Also re-run parity against this checkpoint on fresh random inputs.")
@anchors_option
@quiet_option
def verify(bundle: str, checkpoint: str | None, anchors: str | None, quiet: bool) -> None:
    """Re-check BUNDLE: schema, sha256 of every file, paths, routes, latency tables and parity."""
    from .export.verify import verify_bundle
    from .runtime.lut import check_tables

    net = load(checkpoint, anchors=anchors) if checkpoint else None
    for line in verify_bundle(bundle, net, quiet=quiet):
        click.echo(line)
    click.echo(check_tables(load_bundle(bundle)))


@cli.command("stitch")
@click.argument("anchor_files", nargs=-1, required=True, type=click.Path(dir_okay=False), metavar="ANCHOR.pth...")
@anchors_option
@click.option("--calib", required=True, metavar="FOLDER",
              help="Calibration images (class sub-folders allowed): resized to the anchors' input, "
                   "ImageNet-normalised.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="SN-Net v1 checkpoint to write (atomically).")
@click.option("--calib-count", default=64, show_default=True, type=click.IntRange(min=1),
              help="Images in the least-squares fit (a fixed-seed sample of FOLDER).")
@click.option("--img-size", default=None, type=click.IntRange(min=1),
              help="Input size of the --anchors models (timm img_size); without --anchors it is read from the files.")
@quiet_option
def stitch_command(anchor_files: tuple[str, ...], anchors: str | None, calib: str, out: str, calib_count: int,
                   img_size: int | None, quiet: bool) -> None:
    """Stitch timm ViT checkpoints ANCHOR.pth (smallest first) into an LS-initialised SN-Net v1 checkpoint."""
    from .model.checkpoint import save_checkpoint
    from .model.lsinit import read_anchor, read_calibration_images, stitch

    say = (lambda _line: None) if quiet else (lambda line: click.echo(line, err=True))
    names = [n.strip() for n in anchors.split(",") if n.strip()] if anchors else None
    if len(anchor_files) < 2:
        raise StitchError(f"stitch needs at least 2 anchor checkpoints, got {len(anchor_files)}")
    if names is not None and len(names) != len(anchor_files):
        raise StitchError(f"--anchors: {len(names)} names for {len(anchor_files)} anchor checkpoints; "
                          "give one name per file")
    if img_size is not None:
        if names is None:
            raise StitchError("--img-size needs --anchors: without timm names the input size is read "
                              "from the checkpoints")
        names = [f"{n}:img_size={img_size}" for n in names]
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise StitchError(f"--out {out}: its folder does not exist; create it first")
    if any(os.path.exists(out) and os.path.samefile(out, a) for a in anchor_files if os.path.exists(a)):
        raise StitchError(f"--out {out}: is one of the anchor checkpoints; write the SN-Net to a new file")
    say(f"reading {len(anchor_files)} anchors")
    vits = [read_anchor(path, name) for path, name in zip(anchor_files, names or [None] * len(anchor_files))]
    images = read_calibration_images(calib, tuple(vits[0].patch_embed.img_size), calib_count)
    say(f"least-squares initialisation on {len(images)} images from {calib}")
    net = stitch(vits, images, names)
    save_checkpoint(net, out, args=argparse.Namespace(
        model="snnet_v1", anchors=names, anchor_files=list(anchor_files), calib=calib, calib_count=len(images)))
    layers = sum(key.startswith("stitch:") for key in net.segments)
    click.echo(f"{out}: {len(net.configs)} configs from {len(vits)} anchors ({', '.join(net.anchor_names)}), "
               f"{layers} stitching layers LS-initialised on {len(images)} images")


def _store_runtime_option(ctx: click.Context, param: click.Parameter, value):
    ctx.meta.setdefault("runtime", {})[param.name] = value
    return value


def runtime_options(command):
    """--backend, --device, --threads and the backend's variant: together they make a LUT's device key.

    The values go to ``_runtime`` through the click context, not each command's signature.
    """
    stored = {"expose_value": False, "callback": _store_runtime_option}
    for option in reversed([
        click.option("--backend", default=None, type=click.Choice(["ort", "aoti"]),
                     help="ONNX Runtime, or the bundle's AOTInductor build for this device (export --targets aoti) "
                          "[default: ort on cpu, aoti on cuda].", **stored),
        click.option("--device", default="cpu", show_default=True, help="Where configs run: cpu, or cuda[:N] (aoti).",
                     **stored),
        click.option("--threads", default=None, type=click.IntRange(min=1),
                     help="Intra-op threads [default: the CPUs this process may use].", **stored),
        click.option("--mode", default="segments", show_default=True, type=click.Choice(["segments", "graphs"]),
                     help="ort: chain shared per-segment sessions (least memory) or one session per config graph.",
                     **stored),
        click.option("--cuda-graphs", is_flag=True, help="aoti on cuda: capture each config as a CUDA graph per batch size.",
                     **stored),
    ]):
        command = option(command)
    return command


def _runtime(bundle: str, preload: bool = False):
    """The Runtime the ``runtime_options`` of the current command describe."""
    from .runtime import Runtime
    from .runtime.backend import default_backend

    o = click.get_current_context().meta["runtime"]
    o["backend"] = o["backend"] or default_backend(o["device"])
    if o["backend"] == "ort" and o["cuda_graphs"]:
        raise StitchError("--cuda-graphs applies to --backend aoti only")
    if o["backend"] == "aoti" and o["mode"] != "segments":
        raise StitchError("--mode applies to --backend ort only")
    options = {"mode": o["mode"]} if o["backend"] == "ort" else {"cuda_graphs": o["cuda_graphs"]}
    return Runtime(bundle, device=o["device"], backend=o["backend"], threads=o["threads"], preload=preload, **options)


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise StitchError(f"{what} {text!r}: expected comma-separated integers") from None


metric_option = click.option("--metric", default="p50", show_default=True, type=click.Choice(["p50", "p90", "p99"]),
                             help="Latency percentile compared with the budget.")


@cli.command("bench")
@click.argument("bundle", type=click.Path(file_okay=False))
@runtime_options
@click.option("--batch", "batches", default="1", show_default=True, help="Comma-separated batch sizes.")
@click.option("--runs", default=50, show_default=True, type=click.IntRange(min=1), help="Timed runs per graph.")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(min=0), help="Untimed runs first.")
@click.option("--predict", is_flag=True,
              help="Time each unique segment once and predict every config; only --configs (default: the anchors "
                   "and 4 stitched configs) are measured, to calibrate and check the model.")
@click.option("--configs", default="all", show_default=True, help="'all' or comma-separated config ids to measure.")
@quiet_option
def bench_command(bundle: str, batches: str, runs: int, warmup: int,
                  predict: bool, configs: str, quiet: bool) -> None:
    """Measure every config of BUNDLE on this device; write lut/<device key>.json."""
    from .bench import bench, summary

    rt = _runtime(bundle)
    try:
        earlier = set(rt.lut.batches)
    except StitchError:  # none yet, or one that could not be read: nothing to lose
        earlier = set()
    lut = bench(rt, batches=_ints(batches, "--batch"), runs=runs,
                warmup=warmup, configs=configs, predict=predict, quiet=quiet)
    for line in summary(lut):
        click.echo(line)
    dropped = sorted(earlier - set(lut.batches))
    if dropped:
        click.echo(f"note: this replaced the table measured earlier at batch {', '.join(map(str, dropped))}; a "
                   f"bench writes the device's whole table, so name every batch size in one run "
                   f"(--batch {','.join(map(str, sorted(earlier | set(lut.batches))))})", err=True)


@cli.command("select")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--budget-ms", required=True, type=float, help="Latency budget in milliseconds.")
@metric_option
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1))
@runtime_options
@click.option("--json", "as_json", is_flag=True, help="Print the choice and the Pareto frontier as JSON.")
def select_command(bundle: str, budget_ms: float, metric: str, batch: int, as_json: bool) -> None:
    """Print the most accurate config of BUNDLE that fits the budget on this device."""
    rt = _runtime(bundle)
    choice = rt.choice(budget_ms, metric, batch)
    if as_json:
        click.echo(json.dumps({"device_key": rt.device_key, "lut": rt.lut.path,
                               **rt.selector(metric, batch).report(budget_ms)}))
        return
    quality = f"top-1 {choice.accuracy:.2f}%" if choice.accuracy is not None else "accuracy unknown"
    click.echo(f"config {choice.id}: {choice.latency_ms:.3f} ms {metric} at batch {batch}"
               f"{' (predicted)' if choice.predicted else ''}, {quality}, {choice.flops / 1e9:.3f} GFLOPs; "
               f"fits {budget_ms:g} ms on {rt.device_key}")


@cli.command("accuracy")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--from", "results", default=None, type=click.Path(dir_okay=False),
              help="JSON lines of the public code ({\"cfg_id\": 3, \"acc1\": 72.1, ...}) to import.")
@click.option("--eval", "folder", default=None, type=click.Path(file_okay=False),
              help="Measure top-1 on an image folder (one sub-folder per class, sorted names = labels).")
@click.option("--batch", default=32, show_default=True, type=click.IntRange(min=1), help="--eval batch size.")
@click.option("--crop-pct", default=0.875, show_default=True, type=float,
              help="--eval: resize the shorter side to size / crop-pct, then centre-crop (timm's eval transform).")
@click.option("--no-normalize", is_flag=True, help="--eval: feed [0, 1] pixels (no ImageNet mean/std).")
@runtime_options
@quiet_option
def accuracy_command(bundle: str, results: str | None, folder: str | None, batch: int, crop_pct: float,
                     no_normalize: bool, quiet: bool) -> None:
    """Store every config's top-1 accuracy in BUNDLE's manifest (imported or measured)."""
    from .accuracy import evaluate, import_results, store_accuracy

    if (results is None) == (folder is None):
        raise StitchError("accuracy: give exactly one of --from RESULTS_FILE or --eval IMAGE_FOLDER")
    if results is not None:
        _, found = import_results(bundle, results)
        click.echo(f"{bundle}: top-1 of {len(found)} configs imported from {results} into manifest.json")
        return
    rt = _runtime(bundle, preload=True)
    check_writable(os.path.join(rt.bundle.root, MANIFEST))
    top1 = evaluate(rt, folder, batch=batch, normalize=not no_normalize, crop_pct=crop_pct, quiet=quiet)
    store_accuracy(rt.bundle, top1, f"measured on {os.path.abspath(folder)} ({rt.device_key})")
    for cid, acc in top1.items():
        click.echo(f"{cid:>4}  top-1 {acc:6.2f}%")
    click.echo(f"{bundle}: top-1 of {len(top1)} configs measured on {folder}, stored in manifest.json")


@cli.command("plot")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("--x", "x_axis", default="latency", show_default=True, type=click.Choice(["latency", "flops"]))
@metric_option
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1))
@runtime_options
def plot_command(bundle: str, out: str, x_axis: str, metric: str, batch: int) -> None:
    """Plot every config of BUNDLE (latency or GFLOPs vs accuracy) with the Pareto frontier."""
    from .plot import plot

    rt = _runtime(bundle)
    selector = rt.selector(metric, batch) if x_axis == "latency" else None
    click.echo(f"wrote {plot(rt.bundle, out, x_axis, selector, title=rt.device_key if selector else '')}")


@cli.command()
@click.option("--out", default="stitch-demo", show_default=True, help="Folder for the checkpoint, bundle and pareto.png.")
@click.option("--fast", is_flag=True, help="Shorter training (the CI variant).")
@quiet_option
def demo(out: str, fast: bool, quiet: bool) -> None:
    """Train a tiny SN-Net on scikit-learn's digits, export, bench, and select (nothing downloaded)."""
    from .demo.pipeline import run_demo

    run_demo(out, fast=fast, quiet=quiet, echo=click.echo)


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so cleanup (``finally``) runs as it does for Ctrl-C;
    Python's default would exit at once and leave temporary files and folders behind."""


def _terminate(_signum, _frame):
    raise Terminated


def main(argv: list[str] | None = None) -> None:
    args = list(argv if argv is not None else sys.argv[1:])
    debug = "--debug" in args
    if debug:  # a group option, accepted after the command too ('inspect x.pth --debug')
        args.remove("--debug")
        args.insert(0, "--debug")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        cli.main(args=args, prog_name="stitch-compile", standalone_mode=False)
    except Terminated:
        click.echo("terminated", err=True)
        sys.exit(128 + signal.SIGTERM)
    except StitchError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # usage errors (missing argument, a folder ...): one line too
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(2)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    main()
