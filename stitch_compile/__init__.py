"""stitch-compile: a deployment compiler for stitchable neural networks (SN-Net family)."""

from __future__ import annotations

from .errors import StitchError
from .model import StitchableNet, StitchConfig, StitchSpace, load
from .model.checkpoint import save_checkpoint
from .model.lsinit import stitch

__version__ = "0.1.0"

__all__ = ["StitchError", "StitchableNet", "StitchConfig", "StitchSpace", "load", "save_checkpoint", "stitch",
           "__version__"]
