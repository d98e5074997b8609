"""Check graphs against what TensorRT's ONNX parser accepts, before anyone builds engines.

The engines are often built later, on another machine (``tensorrt/build.sh``); an operator the
parser lacks would only surface there, after the bundle shipped. The supported operator names and
opset range are data (``stitch_compile/tensorrt_onnx_ops.json``), copied from onnx-tensorrt's
docs/operators.md with its source commit, so updating them for a new TensorRT is a data change.
"""

from __future__ import annotations

import functools
import json
import os
from importlib import resources

import onnx

from ..errors import StitchError

DEFAULT_DOMAINS = ("", "ai.onnx")  # custom domains need TensorRT plugins, which a bundle cannot ship


@functools.cache
def parser_support() -> dict:
    """The stored support matrix: {"opset": {"min", "max"}, "operators": [...], "source": url}."""
    return json.loads(resources.files("stitch_compile").joinpath("tensorrt_onnx_ops.json").read_text())


def unsupported(model: onnx.ModelProto) -> list[str]:
    """What in ``model`` TensorRT's ONNX parser rejects: opset out of range, unknown operators."""
    support = parser_support()
    low, high = support["opset"]["min"], support["opset"]["max"]
    problems = [f"opset {o.version} (the parser reads {low}..{high})" for o in model.opset_import
                if o.domain in DEFAULT_DOMAINS and not low <= o.version <= high]
    known = set(support["operators"])
    bad = {_op_name(n) for n in _nodes(model.graph)
           if n.domain not in DEFAULT_DOMAINS or n.op_type not in known}
    return problems + [f"operator {name}" for name in sorted(bad)]


def check_graphs(root: str, graphs: dict[str, str]) -> None:
    """Raise one StitchError naming every graph of ``graphs`` the parser would reject, and why."""
    failures = {}
    for rel in graphs.values():
        problems = unsupported(onnx.load(os.path.join(root, rel), load_external_data=False))
        if problems:
            failures[rel] = problems
    if failures:
        first, problems = next(iter(failures.items()))
        more = f" (and {len(failures) - 1} more graphs)" if len(failures) > 1 else ""
        raise StitchError(f"{first}{more}: TensorRT's ONNX parser does not support {', '.join(problems)}; "
                          f"see {parser_support()['source']} or export without the tensorrt target")


def _op_name(node: onnx.NodeProto) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain not in DEFAULT_DOMAINS else node.op_type


def _nodes(graph: onnx.GraphProto):
    """Every node, including those inside If/Loop/Scan bodies."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
                yield from _nodes(sub)
