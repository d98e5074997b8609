"""ONNX Runtime sessions that share one mapped copy of the bundle's weight files.

Every config graph names its weights as external data in ``weights.bin``. Instead of letting each
session read its own copy, the weight files are memory-mapped once and every external initializer
is handed to ONNX Runtime as an OrtValue viewing that map (``SessionOptions.add_initializer``), so
all configs resident together cost about one copy of the weights. Used by export (parity) and by
the runtime, hence it lives beside them rather than inside either.

Graphs are untrusted input: an external-data reference must name a file inside the folder and a
byte range inside that file that holds exactly the tensor's bytes.
"""

from __future__ import annotations

import mmap
import os
import threading

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import external_data_helper, helper

from .bundle import inside
from .errors import StitchError, first_line

# what onnx.load and InferenceSession raise for a malformed graph (none derives from a common base)
_ORT_ERRORS = tuple(getattr(ort.capi.onnxruntime_pybind11_state, name)
                    for name in ("Fail", "InvalidGraph", "InvalidArgument", "InvalidProtobuf", "NotImplemented"))


class SharedWeights:
    """Memory maps of the external-data files of one graph folder, opened once."""

    def __init__(self, folder: str):
        self.folder = folder
        self._maps: dict[str, np.memmap] = {}
        self._identity: dict[str, tuple] = {}  # location -> (device, inode) of the file mapped
        self._values: dict[tuple, ort.OrtValue] = {}
        self._arrays: dict[tuple, np.ndarray] = {}  # keeps the views that OrtValues point into alive
        self._lock = threading.Lock()

    def _map(self, location: str) -> np.memmap:
        if location not in self._maps:
            path = inside(self.folder, location)
            if not os.path.isfile(path):
                raise StitchError(f"{self.folder}: a graph names missing weight file {location!r}; "
                                  f"the bundle is incomplete")
            try:
                self._maps[location] = np.memmap(path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as e:  # e.g. emptied after the bundle was loaded
                raise StitchError(f"{self.folder}: cannot map weight file {location!r} ({first_line(e)}); "
                                  f"the bundle is damaged") from None
            self._identity[location] = _identity(path)
        return self._maps[location]

    def _check_unchanged(self, graph_path: str) -> None:
        """A graph opened after its bundle was exported again would read its offsets in the old,
        still-mapped weights: wrong logits with no error. Refuse instead."""
        with self._lock:
            changed = [loc for loc, ident in self._identity.items() if _identity(inside(self.folder, loc)) != ident]
        if changed:
            raise StitchError(f"{graph_path}: the bundle changed while in use ({changed[0]} was replaced); "
                              "load it again")

    def value(self, tensor: onnx.TensorProto) -> ort.OrtValue:
        """OrtValue viewing ``tensor``'s bytes in the mapped file (one per distinct slot)."""
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        except ValueError:
            offset = length = -1
        key = (location, offset, length, dtype.str, tuple(tensor.dims))
        with self._lock:
            if key not in self._values:
                data = self._map(location)
                if offset < 0 or offset + length > data.size or length != dtype.itemsize * int(np.prod(tensor.dims)):
                    raise StitchError(f"{self.folder}: tensor {tensor.name!r} points outside {location!r} "
                                      f"or has the wrong size; the bundle is tampered")
                raw = data[offset:offset + length]
                array = raw.view(dtype).reshape(tuple(tensor.dims))
                self._arrays[key] = array
                self._values[key] = ort.OrtValue.ortvalue_from_numpy(array)
            return self._values[key]

    def release_pages(self) -> None:
        """Drop this process's resident pages of the maps (the file and page cache are untouched).

        Sessions that pre-pack their weights keep a packed copy and never read the original again;
        releasing the pages keeps those bytes from being resident twice. Pages still read later
        (biases, norms) fault back in from the page cache on their next use.
        """
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        with self._lock:
            for data in self._maps.values():
                data._mmap.madvise(mmap.MADV_DONTNEED)

    def session(self, graph_path: str, options: ort.SessionOptions | None = None,
                providers: list[str] | None = None) -> ort.InferenceSession:
        """An InferenceSession for ``graph_path`` whose external weights come from the shared maps."""
        options = options or ort.SessionOptions()
        self._check_unchanged(graph_path)
        try:
            model = onnx.load(graph_path, load_external_data=False)
            for tensor in model.graph.initializer:
                if external_data_helper.uses_external_data(tensor):
                    options.add_initializer(tensor.name, self.value(tensor))
            return ort.InferenceSession(graph_path, sess_options=options, providers=providers or ["CPUExecutionProvider"])
        except (DecodeError, *_ORT_ERRORS) as exc:  # a graph that hashes right (manifest edited too) yet is no model
            raise StitchError(f"{graph_path}: ONNX Runtime cannot load it ({first_line(exc)}); "
                              "the bundle is corrupt or tampered, re-export it") from None
        except OSError as e:  # sessions open on first use: the bundle was replaced or emptied since it was loaded
            raise StitchError(f"{graph_path}: cannot read it ({e.strerror or e}); the bundle changed while "
                              "in use, load it again") from None


def _identity(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
