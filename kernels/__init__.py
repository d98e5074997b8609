"""Custom kernels for stitching layers (installed as ``stitch_compile.kernels``).

Importing this package registers the ``stitch_compile::stitch_linear_ln`` op. Triton is only
imported when a CUDA tensor reaches the op, so CPU-only installs can still trace and export.
"""

from .fused import FusedStitch, StitchedBlock, fuse, fused_forward
from .ops import stitch_linear_ln

__all__ = ["FusedStitch", "StitchedBlock", "fuse", "fused_forward", "stitch_linear_ln"]
