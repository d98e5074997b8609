"""stitch-compile: a deployment compiler for stitchable neural networks (SN-Net family).

The public names are imported on first use: an application that only runs a bundle with ONNX
Runtime (``stitch_compile.Runtime``) never imports torch or timm, which would cost it seconds and
hundreds of MB per process. ``stitch_compile.export`` is both the ``export`` function and, once
imported, the subpackage of that name, which is callable as the function (see export/__init__.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

from .errors import StitchError  # noqa: E402  (light; export reads __version__ while importing)

_LAZY = {  # public name -> module that defines it
    "export": ".export", "StitchableNet": ".model", "StitchConfig": ".model", "StitchSpace": ".model",
    "load": ".model", "save_checkpoint": ".model.checkpoint", "stitch": ".model.lsinit", "Runtime": ".runtime",
}

if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from .export import export
    from .model import StitchableNet, StitchConfig, StitchSpace, load
    from .model.checkpoint import save_checkpoint
    from .model.lsinit import stitch
    from .runtime import Runtime

__all__ = ["Runtime", "StitchError", "StitchableNet", "StitchConfig", "StitchSpace", "export", "load", "save_checkpoint", "stitch",
           "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # importing the export subpackage bound its module here: the function wins
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
