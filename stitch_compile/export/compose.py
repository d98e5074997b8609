"""Compose one ONNX graph per config from the traced segment graphs.

Each segment graph is prepared once: every name gets the segment's prefix (so a config can hold
many segments without clashes, and one segment keeps the same names in every config) and its
initializers move into the shared weight store. A config graph is then the route's segment
graphs joined by Identity edges, which ONNX Runtime and TensorRT remove at load time.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, compose, helper

from .trace import IN, OUT
from .weights import WeightStore

IMAGE, LOGITS = "image", "logits"
INLINE_MAX_BYTES = 64  # shape constants stay in the graph; every weight goes to the store


def file_key(segment_key: str) -> str:
    """Segment key as used in file and tensor names: ``block:0:3`` -> ``block-0-3``."""
    return segment_key.replace(":", "-")


def prepare_segment(key: str, model: onnx.ModelProto, store: WeightStore) -> onnx.ModelProto:
    """Prefix every name with the segment key and externalise its weights into ``store``."""
    _shorten_names(model.graph)
    prefixed = compose.add_prefix(model, prefix=file_key(key) + "/")
    for tensor in prefixed.graph.initializer:
        if payload_bytes(tensor) > INLINE_MAX_BYTES:
            store.externalize(tensor)
    return prefixed


def _shorten_names(graph: onnx.GraphProto) -> None:
    """Intermediate values become ``0``, ``1`` ...; node names and doc strings go.

    The exporter's names (``/blocks.3/attn/Reshape_output_0``) are most of a graph's bytes, and
    every config graph repeats them for each segment it runs: short names keep a composed
    config graph well under 100 KB.
    """
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {t.name for t in graph.initializer}
    short: dict[str, str] = {}
    for node in graph.node:
        node.name, node.doc_string = "", ""
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name and name not in keep:
                    names[i] = short.setdefault(name, str(len(short)))
    del graph.value_info[:]


def payload_bytes(tensor: TensorProto) -> int:
    count = 1
    for d in tensor.dims:
        count *= d
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def standalone_segment(key: str, prepared: onnx.ModelProto) -> onnx.ModelProto:
    """A prepared segment as a model of its own (input ``x``, output ``y``) for latency probes."""
    return _join([prepared], IN, OUT, prepared.graph.input[0].type, prepared.graph.output[0].type)


def compose_config(route: list[str], prepared: dict[str, onnx.ModelProto],
                   image_shape: list, classes: int) -> onnx.ModelProto:
    """The graph of one config: ``image`` [batch, C, H, W] -> ``logits`` [batch, classes]."""
    image = helper.make_tensor_type_proto(TensorProto.FLOAT, ["batch", *image_shape])
    logits = helper.make_tensor_type_proto(TensorProto.FLOAT, ["batch", classes])
    return _join([prepared[k] for k in route], IMAGE, LOGITS, image, logits)


def _join(parts: list[onnx.ModelProto], graph_in: str, graph_out: str, in_type, out_type) -> onnx.ModelProto:
    """Chain prepared segment graphs with Identity edges between each output and the next input."""
    nodes, inits, prev = [], [], graph_in
    for part in parts:
        g = part.graph
        nodes.append(helper.make_node("Identity", [prev], [g.input[0].name]))
        nodes.extend(g.node)
        inits.extend(g.initializer)
        prev = g.output[0].name
    nodes.append(helper.make_node("Identity", [prev], [graph_out]))
    graph = helper.make_graph(
        nodes, "stitch", [helper.make_value_info(graph_in, in_type)],
        [helper.make_value_info(graph_out, out_type)], initializer=inits)
    first = parts[0]
    model = helper.make_model(graph, opset_imports=first.opset_import, producer_name="stitch-compile")
    model.ir_version = first.ir_version
    return model
