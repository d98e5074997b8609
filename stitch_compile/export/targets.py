"""Which targets exist, and which this machine can build.

``--targets all`` builds every target whose toolchain is present and reports each other one as
skipped in one line; naming a target that cannot be built here is an error, except ``tensorrt``:
its engines belong to the device anyway, so naming it without TensorRT or a GPU writes
``tensorrt/build.sh`` for the device instead (``all`` does not: it only builds what it can here).
"""

from __future__ import annotations

import importlib.util
import os
import shutil

from ..errors import StitchError

KNOWN = ("onnx", "ort", "tensorrt", "aoti")
DEFERRED = {"tensorrt": "name it in --targets to get tensorrt/build.sh for the target device"}


def unavailable_reason(target: str) -> str | None:
    """Why ``target`` cannot be built on this machine, or None when it can."""
    if target in ("onnx", "ort"):
        return None
    if target == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            return "the tensorrt package is not installed"
        import tensorrt
        import torch

        if int(tensorrt.__version__.split(".")[0]) < 10:
            return f"TensorRT {tensorrt.__version__} is installed; weight-stripped engines need 10 or newer"
        return None if torch.cuda.is_available() else "no CUDA GPU is visible"
    if target == "aoti":
        from torch._inductor import config

        compiler = os.environ.get("CXX") or config.cpp.cxx[-1] or "g++"
        return None if shutil.which(compiler) else f"no C++ compiler ({compiler}) on PATH; AOTInductor needs one"
    raise StitchError(f"unknown target {target!r}")


def resolve(requested: str | list[str] | tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """(targets to build, {skipped target: reason}) for a ``--targets`` value."""
    names = requested.split(",") if isinstance(requested, str) else list(requested)
    names = [n.strip().lower() for n in names if n.strip()]
    if names == ["all"]:
        skipped = {t: r for t in KNOWN if (r := unavailable_reason(t))}
        skipped.update({t: f"{skipped[t]}; {hint}" for t, hint in DEFERRED.items() if t in skipped})
        return [t for t in KNOWN if t not in skipped], skipped
    for name in names:
        if name not in KNOWN:
            raise StitchError(f"unknown target {name!r}; choose from {', '.join(KNOWN)} or 'all'")
        reason = unavailable_reason(name)
        if reason and name not in DEFERRED:
            raise StitchError(f"target {name} cannot be built here: {reason}")
    if "ort" in names and "onnx" not in names:
        names.insert(0, "onnx")  # the ort graphs are optimised from the onnx ones, over the same weights
    return [t for t in KNOWN if t in names], {}
