"""fp16 variants of the config graphs, their weights converted once into one shared fp16 store.

TensorRT 11 has no FP16 builder flag: precision comes from the graph (a strongly typed network),
so ``--precision fp16`` needs graphs whose tensors are float16. Every float value on the data path
(computed from ``image``) becomes float16, and each weight or constant it meets is converted
where it is used; a weight is converted once for all configs (keyed by its slot in weights.bin)
into ``onnx/weights.fp16.bin``. LayerNormalization, Softmax and ReduceMean run in float32 between
Casts, because their reductions lose too much in float16, and their own parameters stay in
weights.bin. ``image`` and ``logits`` stay float32 (Casts at the edges), so the fp16 graph is a
drop-in for the fp32 one. Values off the data path (shape arithmetic, masks built from shapes)
keep float32 and are cast where they meet it, so no shape computation is done in float16.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper, shape_inference

from ..errors import StitchError
from .compose import IMAGE, INLINE_MAX_BYTES, LOGITS, payload_bytes
from .weights import WeightStore

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
KEEP_FP32 = frozenset({"LayerNormalization", "Softmax", "ReduceMean"})
FP16_WEIGHTS = "weights.fp16.bin"
_FP16_MAX = float(np.finfo(np.float16).max)


class Fp16Graphs:
    """Writes fp16 variants of the graphs of one folder into one fp16 weight store."""

    def __init__(self, onnx_dir: str):
        self.dir = onnx_dir
        self.store = WeightStore(os.path.join(onnx_dir, FP16_WEIGHTS))
        self._converted: dict[tuple, TensorProto] = {}  # fp32 slot -> its fp16 tensor in the store

    def write(self, src: str, dst: str) -> None:
        model = onnx.load(src, load_external_data=False)
        onnx.save(self.convert(model, os.path.basename(src)), dst)

    def close(self) -> None:
        self.store.close()

    def convert(self, model: onnx.ModelProto, name: str = "graph") -> onnx.ModelProto:
        """The fp16 form of ``model`` (input ``image``, output ``logits``, both still float32)."""
        g = shape_inference.infer_shapes(model).graph
        types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}
        types.update({t.name: t.data_type for t in g.initializer})
        rewrite = _Rewrite(self, types, {t.name: t for t in g.initializer},
                           {n.output[0]: n.attribute[0].t for n in g.node if n.op_type == "Constant"
                            and n.attribute[0].name == "value"}, name)
        nodes, added = rewrite.run(g.node)
        used = {i for n in nodes for i in n.input}
        inits = [t for t in g.initializer if t.name in used] + added
        out = helper.make_model(helper.make_graph(nodes, g.name, list(model.graph.input), list(model.graph.output),
                                                  initializer=inits),
                                opset_imports=model.opset_import, producer_name="stitch-compile")
        out.ir_version = model.ir_version
        try:
            shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
        except onnx.shape_inference.InferenceError as exc:
            raise StitchError(f"{name}: its fp16 variant is not type-correct ({str(exc).splitlines()[0]}); "
                              "export with --precision fp32") from None
        return out

    def half_tensor(self, tensor: TensorProto, name: str) -> TensorProto:
        """``tensor`` as float16 named ``name``; a stored weight is converted and stored once."""
        if not external_data_helper.uses_external_data(tensor):
            return numpy_helper.from_array(_to_half(numpy_helper.to_array(tensor)), name)
        ref = {e.key: e.value for e in tensor.external_data}
        slot = (ref["location"], ref.get("offset", "0"), ref["length"], tuple(tensor.dims))
        if slot not in self._converted:
            half = numpy_helper.from_array(_to_half(numpy_helper.to_array(tensor, base_dir=self.dir)), "")
            if payload_bytes(half) > INLINE_MAX_BYTES:
                self.store.externalize(half)
            self._converted[slot] = half
        out = TensorProto()
        out.CopyFrom(self._converted[slot])
        out.name = name
        return out


class _Rewrite:
    """One graph's pass: which values are float16 now, and the Casts and tensors that adds."""

    def __init__(self, graphs: Fp16Graphs, types: dict, inits: dict, consts: dict, name: str):
        self.graphs, self.types, self.inits, self.consts, self.name = graphs, types, inits, consts, name
        self.half: set[str] = set()  # values that are float16 in the new graph
        self.nodes: list[onnx.NodeProto] = []
        self.added: dict[str, TensorProto] = {}
        self.casts: set[str] = set()

    def run(self, nodes) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
        image = self.cast(IMAGE, HALF)
        self.half.add(image)
        for original in nodes:
            node = onnx.NodeProto()
            node.CopyFrom(original)
            node.input[:] = [image if i == IMAGE else i for i in node.input]
            floats = [k for k, i in enumerate(node.input) if i in self.half or self.types.get(i) == FLOAT]
            if not any(node.input[k] in self.half for k in floats):
                self.nodes.append(node)  # off the data path: stays float32
            elif node.op_type in KEEP_FP32:
                self.fp32_island(node, floats)
            else:
                self.fp16_node(node, floats)
        self.nodes.append(helper.make_node("Cast", [self.cast_output(LOGITS)], [LOGITS], to=FLOAT))
        return _live(self.nodes, LOGITS), list(self.added.values())

    def fp16_node(self, node: onnx.NodeProto, floats: list[int]) -> None:
        for k in floats:
            if node.input[k] not in self.half:
                node.input[k] = self.half_input(node.input[k])
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == FLOAT:
                    attr.i = HALF
        self.nodes.append(node)
        for out in node.output:
            if out and self._float_output(node, out):
                self.half.add(out)

    def fp32_island(self, node: onnx.NodeProto, floats: list[int]) -> None:
        for k in floats:
            if node.input[k] in self.half:
                node.input[k] = self.cast(node.input[k], FLOAT)
        outs = [o for o in node.output if o and self._float_output(node, o)]
        node.output[:] = [f"{o}.fp32" if o in outs else o for o in node.output]
        self.nodes.append(node)
        for o in outs:
            self.nodes.append(helper.make_node("Cast", [f"{o}.fp32"], [o], to=HALF))
            self.half.add(o)
            self.casts.add(f"{o}.fp32")  # a later float32 reader takes the island's output as it is

    def half_input(self, name: str) -> str:
        """The float16 counterpart of a float32 value that meets the data path."""
        tensor = self.inits.get(name, self.consts.get(name))
        if tensor is None:
            return self.cast(name, HALF)
        out = f"{name}.fp16"
        if out not in self.added:
            self.added[out] = self.graphs.half_tensor(tensor, out)
        return out

    def cast(self, name: str, to: int) -> str:
        out = f"{name}.{'fp16' if to == HALF else 'fp32'}"
        if out not in self.casts:
            self.casts.add(out)
            self.nodes.append(helper.make_node("Cast", [name], [out], to=to))
        return out

    def cast_output(self, name: str) -> str:
        """Rename the producer of graph output ``name`` so that a final Cast can produce it."""
        producer = next(n for n in self.nodes if name in n.output)
        renamed = f"{name}.fp16"
        producer.output[:] = [renamed if o == name else o for o in producer.output]
        return renamed

    def _float_output(self, node: onnx.NodeProto, out: str) -> bool:
        if out not in self.types:
            raise StitchError(f"{self.name}: the type of {node.op_type} output {out!r} cannot be inferred, "
                              "so its fp16 variant cannot be made; export with --precision fp32")
        return self.types[out] == FLOAT


def _to_half(array: np.ndarray) -> np.ndarray:
    """float32 -> float16, saturating instead of overflowing to inf."""
    return np.clip(array, -_FP16_MAX, _FP16_MAX).astype(np.float16)


def _live(nodes: list[onnx.NodeProto], output: str) -> list[onnx.NodeProto]:
    """``nodes`` without those nothing reads any more (Constants whose users now read an fp16 copy)."""
    needed, kept = {output}, []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    return kept[::-1]


def fp16_graphs(root: str, graphs: dict[str, str]) -> dict[str, str]:
    """Write ``onnx/config_<id>.fp16.onnx`` for each graph and ``onnx/weights.fp16.bin``."""
    converter = Fp16Graphs(os.path.join(root, "onnx"))
    out = {}
    for cid, rel in graphs.items():
        out[cid] = rel.replace(".onnx", ".fp16.onnx")
        converter.write(os.path.join(root, rel), os.path.join(root, out[cid]))
    converter.close()
    return out
