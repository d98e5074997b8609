"""Trace each unique segment to ONNX exactly once.

A config graph is composed from these segment graphs, so tracing cost is O(segments), not
O(configs x depth). The TorchScript-based exporter is used: it is several times faster per graph
than the dynamo exporter and constant-folds Linear weights into pre-transposed MatMul operands,
which is what a shared weight store wants (no per-session Transpose folding at load time).
"""

from __future__ import annotations

import contextlib
import io
import warnings

import onnx
import torch

from ..errors import StitchError, first_line
from ..model.network import Segment

IN, OUT = "x", "y"


@contextlib.contextmanager
def unfused_attention(module: torch.nn.Module):
    """timm's fused SDPA path does not trace with the TorchScript exporter; use the explicit one."""
    touched = [m for m in module.modules() if getattr(m, "fused_attn", False)]
    for m in touched:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in touched:
            m.fused_attn = True


def trace_segment(segment: Segment, opset: int) -> onnx.ModelProto:
    """ONNX graph of one segment: input ``x`` [batch, *in_shape], output ``y``, dynamic batch."""
    example = torch.randn(2, *segment.in_shape)
    buf = io.BytesIO()
    with torch.no_grad(), unfused_attention(segment.module), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                segment.module, (example,), buf, dynamo=False, opset_version=opset,
                input_names=[IN], output_names=[OUT],
                dynamic_axes={IN: {0: "batch"}, OUT: {0: "batch"}}, do_constant_folding=True,
            )
        except torch.onnx.errors.OnnxExporterError as exc:  # an operator the opset lacks
            raise StitchError(f"--opset {opset}: segment {segment.key} cannot be exported at this opset "
                              f"({first_line(exc)}); use a newer opset") from None
    return onnx.load_from_string(buf.getvalue())
