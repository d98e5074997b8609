"""Target ``ort``: ONNX Runtime's offline-optimised graphs, still sharing the weight store.

ONNX Runtime writes an optimised model with its initializers in a file of its own. Those are
matched back by content: a tensor the optimiser left untouched points into ``weights.bin`` again,
and a tensor it derived (a fused or re-laid-out weight) is stored once, in ``weights.ort.bin``,
for all configs. The graphs use extended (not layout-specific) optimisations, for the CPU EP.
"""

from __future__ import annotations

import os
import tempfile

import onnx
import onnxruntime as ort

from .compose import INLINE_MAX_BYTES, payload_bytes
from .weights import WeightStore


def optimize(src: str, dst: str, derived: WeightStore) -> None:
    """Write ONNX Runtime's optimised form of graph ``src`` to ``dst`` over the shared stores."""
    with tempfile.TemporaryDirectory(dir=os.path.dirname(dst)) as tmp:
        opt_path = os.path.join(tmp, "opt.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = opt_path
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.bin")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         str(INLINE_MAX_BYTES))
        ort.InferenceSession(src, sess_options=options, providers=["CPUExecutionProvider"])
        model = onnx.load(opt_path)
        for tensor in model.graph.initializer:
            if payload_bytes(tensor) > INLINE_MAX_BYTES:
                derived.externalize(tensor)
        onnx.save(model, dst)
