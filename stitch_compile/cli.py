"""The ``stitch-compile`` command: thin wrappers over the public API.

Bad input raises :class:`StitchError`; ``main`` prints its one line and exits 2 (``--debug``
keeps the traceback). Nothing here holds logic the Python API lacks.
"""

from __future__ import annotations

import json
import os
import sys

import click

from . import __version__
from .errors import StitchError
from .model import describe_route, load


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
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@anchors_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def inspect(checkpoint: str, anchors: str | None, as_json: bool) -> None:
    """List every stitching configuration of CHECKPOINT: id, route, GFLOPs, params."""
    net = load(checkpoint, anchors=anchors)
    if as_json:
        click.echo(json.dumps(net.describe()))
        return
    click.echo(f"family {net.family}, {len(net.configs)} configs, anchors: {', '.join(net.anchor_names)}")
    click.echo(f"{'id':>4}  {'GFLOPs':>8}  {'params(M)':>9}  route")
    for c in net.configs:
        click.echo(f"{c.id:>4}  {c.flops / 1e9:>8.3f}  {c.params / 1e6:>9.2f}  {describe_route(c.route)}")


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
@anchors_option
@quiet_option
def export(checkpoint: str, out: str | None, targets: str, configs: str, opset: int, precision: str, max_batch: int,
           anchors: str | None, quiet: bool) -> None:
    """Compile every config of CHECKPOINT into a bundle, weights stored once, parity-checked."""
    from .export import export as export_bundle

    net = load(checkpoint, anchors=anchors)
    out = out or os.path.splitext(checkpoint)[0] + ".bundle"
    bundle = export_bundle(net, out, targets=targets, configs=configs, opset=opset, quiet=quiet,
                           report=lambda line: click.echo(line, err=True), precision=precision, max_batch=max_batch)
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
    """Re-check BUNDLE: schema, sha256 of every file, paths, and parity."""
    from .export.verify import verify_bundle

    net = load(checkpoint, anchors=anchors) if checkpoint else None
    for line in verify_bundle(bundle, net, quiet=quiet):
        click.echo(line)


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="stitch-compile", standalone_mode=False)
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


if __name__ == "__main__":
    main()
