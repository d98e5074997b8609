"""One shared weight store: every unique tensor written once, at aligned offsets.

Initializers of every graph become ONNX external-data references into the store. Identical
tensors (same dtype, shape and bytes) share one slot, so a tensor reachable from many configs, or
equal in two segments, costs its bytes once. Tensors of 64 KiB or more start on a 64 KiB boundary
(a runtime can map the file and hand out page-aligned, zero-copy views); smaller ones (norm
scales, biases) are packed at 64-byte alignment into the gaps that alignment leaves, because a
64 KiB slot each would pad a DeiT Ti/S/B store by ~16 MB (3.4%).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
from onnx import numpy_helper

ALIGN = 64 * 1024
SMALL_ALIGN = 64


class WeightStore:
    """Append-only writer of one external-data file, deduplicating by content.

    A store with a ``base`` (the ``ort`` target's derived tensors) first looks a tensor up in the
    base store and only writes what the base does not already hold.
    """

    def __init__(self, path: str, base: "WeightStore | None" = None):
        self.path = path
        self.location = os.path.basename(path)
        self.base = base
        self._file = open(path, "wb")
        self._slots: dict[bytes, tuple[int, int]] = {}
        self._gaps: list[list[int]] = []  # [start, end) holes left before 64 KiB-aligned tensors
        self.size = 0
        self.unique_bytes = 0

    def find(self, array: np.ndarray) -> tuple[str, int, int] | None:
        """(file name, offset, length) of the slot holding exactly ``array``, here or in the base; else None."""
        return self._find(_content_key(array, np.ascontiguousarray(array).tobytes()))

    def _find(self, key: bytes) -> tuple[str, int, int] | None:
        if self.base is not None and key in self.base._slots:
            return (self.base.location, *self.base._slots[key])
        slot = self._slots.get(key)
        return None if slot is None else (self.location, *slot)

    def add(self, array: np.ndarray) -> tuple[str, int, int]:
        """Store ``array`` (once) and return (file name, offset, length) of its slot."""
        data = np.ascontiguousarray(array).tobytes()
        key = _content_key(array, data)
        found = self._find(key)
        if found is None:
            offset = self._place(len(data))
            self._file.seek(offset)
            self._file.write(data)
            self._slots[key] = (offset, len(data))
            self.unique_bytes += len(data)
            found = (self.location, offset, len(data))
        return found

    def _place(self, length: int) -> int:
        """Offset for a new tensor: first fitting gap for small ones, else the aligned end."""
        if length < ALIGN:
            for gap in self._gaps:
                offset = _align(gap[0], SMALL_ALIGN)
                if offset + length <= gap[1]:
                    gap[0] = offset + length
                    return offset
            offset = _align(self.size, SMALL_ALIGN)
        else:
            offset = _align(self.size, ALIGN)
            if offset > self.size:
                self._gaps.append([self.size, offset])
        self.size = offset + length
        return offset

    def externalize(self, tensor: onnx.TensorProto) -> None:
        """Move ``tensor``'s payload into the store and leave an external-data reference."""
        location, offset, length = self.add(numpy_helper.to_array(tensor))
        tensor.ClearField("raw_data")
        for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            tensor.ClearField(field)
        del tensor.external_data[:]
        for key, value in (("location", location), ("offset", offset), ("length", length)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        tensor.data_location = onnx.TensorProto.EXTERNAL

    def close(self) -> None:
        self._file.truncate(self.size)
        self._file.close()


def _content_key(array: np.ndarray, data: bytes) -> bytes:
    return hashlib.sha256(f"{array.dtype.str}{array.shape}".encode() + data).digest()


def _align(offset: int, alignment: int) -> int:
    return -(-offset // alignment) * alignment
