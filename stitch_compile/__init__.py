"""stitch-compile: a deployment compiler for stitchable neural networks (SN-Net family)."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import StitchError  # noqa: E402  (export reads __version__ while importing)
from .export import export  # noqa: E402
from .model import StitchableNet, StitchConfig, StitchSpace, load  # noqa: E402
from .model.checkpoint import save_checkpoint  # noqa: E402
from .model.lsinit import stitch  # noqa: E402
from .runtime import Runtime  # noqa: E402

__all__ = ["Runtime", "StitchError", "StitchableNet", "StitchConfig", "StitchSpace", "export", "load", "save_checkpoint", "stitch",
           "__version__"]
