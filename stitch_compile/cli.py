"""The ``stitch-compile`` command: thin wrappers over the public API.

Bad input raises :class:`StitchError`; ``main`` prints its one line and exits 2 (``--debug``
keeps the traceback). Nothing here holds logic the Python API lacks.
"""

from __future__ import annotations

import json
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
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)


if __name__ == "__main__":
    main()
