"""Custom kernels for stitching layers (installed as ``stitch_compile.kernels``)."""
