"""ONNX Runtime sessions that share one mapped copy of the bundle's weight files.

Every config graph names its weights as external data in ``weights.bin``. Instead of letting each
session read its own copy, the weight files are memory-mapped once and every external initializer
is handed to ONNX Runtime as an OrtValue viewing that map (``SessionOptions.add_initializer``), so
all configs resident together cost about one copy of the weights. Used by export (parity) and by
the runtime, hence it lives beside them rather than inside either.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper, helper


class SharedWeights:
    """Memory maps of the external-data files of one graph folder, opened once."""

    def __init__(self, folder: str):
        self.folder = folder
        self._maps: dict[str, np.memmap] = {}
        self._values: dict[tuple, ort.OrtValue] = {}
        self._arrays: dict[tuple, np.ndarray] = {}  # keeps the views that OrtValues point into alive
        self._lock = threading.Lock()

    def _map(self, location: str) -> np.memmap:
        if location not in self._maps:
            path = os.path.join(self.folder, location)
            self._maps[location] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._maps[location]

    def value(self, tensor: onnx.TensorProto) -> ort.OrtValue:
        """OrtValue viewing ``tensor``'s bytes in the mapped file (one per distinct slot)."""
        info = {e.key: e.value for e in tensor.external_data}
        offset, length = int(info.get("offset", 0)), int(info["length"])
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        key = (info["location"], offset, length, dtype.str, tuple(tensor.dims))
        with self._lock:
            if key not in self._values:
                raw = self._map(info["location"])[offset:offset + length]
                array = raw.view(dtype).reshape(tuple(tensor.dims))
                self._arrays[key] = array
                self._values[key] = ort.OrtValue.ortvalue_from_numpy(array)
            return self._values[key]

    def session(self, graph_path: str, options: ort.SessionOptions | None = None,
                providers: list[str] | None = None) -> ort.InferenceSession:
        """An InferenceSession for ``graph_path`` whose external weights come from the shared maps."""
        options = options or ort.SessionOptions()
        model = onnx.load(graph_path, load_external_data=False)
        for tensor in model.graph.initializer:
            if external_data_helper.uses_external_data(tensor):
                options.add_initializer(tensor.name, self.value(tensor))
        return ort.InferenceSession(graph_path, sess_options=options, providers=providers or ["CPUExecutionProvider"])
