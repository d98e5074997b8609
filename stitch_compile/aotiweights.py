"""AOTInductor packages of a bundle, loaded over one copy of the weights.

The packages hold code only (compiled with ``aot_inductor.package_constants_in_so=False``); each
segment's constants are views into the bundle's weight files, listed in ``constants.json`` and
handed over with ``load_constants(..., user_managed=True)``, so AOTInductor neither copies nor owns
them. On the CPU the views are a memory map of the files; on a GPU each file is uploaded once and
every segment's constants view that one upload. Used by export (parity) and by the runtime, hence
it lives beside them rather than inside either.

The bundle is untrusted input: every path must stay inside it, and every constant must name a
byte range inside its file that holds exactly its dtype and shape.
"""

from __future__ import annotations

import os
import threading
from typing import Callable

import numpy as np
import torch

from .bundle import inside, read_json
from .errors import StitchError
from .hardware import hardware_model, slug

CONSTANTS_FORMAT, CONSTANTS_VERSION = "stitch-compile-aoti-constants", 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def torch_minor() -> str:
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def load_package(path: str, device_index: int = -1, single_threaded: bool = False):
    """torch's C++ package loader, without ``aoti_load_package``'s Python layer, which re-reads the
    archive on every load (10x slower per segment here).

    ``single_threaded`` drops the loader's synchronisation between threads, which conflicts with
    CUDA graph capture (torch documents the flag for that); the caller must serialise runs itself.
    """
    return torch._C._aoti.AOTIModelPackageLoader(path, "model", single_threaded, 1, device_index)


def build_key(device: torch.device) -> str:
    """Where packages run: compiled code is tied to the device type, its hardware and torch's ABI."""
    return slug(f"{device.type}-{hardware_model(device)}-torch{torch_minor()}", limit=120)


class AotiPackages:
    """One AOTInductor build of a bundle (``targets.aoti.builds[key]``) on one torch device.

    ``single_threaded`` loads every package for CUDA graph capture (see ``load_package``).
    """

    def __init__(self, root: str, key: str, build: dict, device: torch.device, single_threaded: bool = False):
        self.root, self.key, self.build, self.device = root, key, build, device
        self.single_threaded = single_threaded
        self._constants = self._read_constants()
        self._files: dict[str, torch.Tensor] = {}
        self._loaded: dict[str, object] = {}
        self._lock = threading.Lock()

    def _tampered(self, what: str) -> StitchError:
        return StitchError(f"{self.root}: aoti build {self.key}: {what}; the bundle is tampered")

    def _read_constants(self) -> dict:
        path = inside(self.root, self.build["constants"])
        try:
            data = read_json(path)
        except (OSError, ValueError) as e:
            raise self._tampered(f"cannot read {self.build['constants']} ({e.__class__.__name__})") from None
        if (not isinstance(data, dict) or data.get("format") != CONSTANTS_FORMAT
                or data.get("version") != CONSTANTS_VERSION or not isinstance(data.get("segments"), dict)):
            raise self._tampered(f"{self.build['constants']} is not a v{CONSTANTS_VERSION} {CONSTANTS_FORMAT} file")
        return data["segments"]

    def _file(self, rel: str) -> torch.Tensor:
        """The whole weight file as uint8 on the device: mapped on the CPU, uploaded once to a GPU."""
        data = self._files.get(rel)
        if data is None:
            path = inside(self.root, rel)
            if not os.path.isfile(path):
                raise self._tampered(f"constants name missing weight file {rel!r}")
            # copy-on-write map: writable for torch, yet nothing is ever copied unless written
            data = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c")) if os.path.getsize(path) else \
                torch.empty(0, dtype=torch.uint8)
            if self.device.type != "cpu":
                data = data.to(self.device)
            self._files[rel] = data
        return data

    def constants(self, segment: str) -> dict[str, torch.Tensor]:
        """{constant fqn: view of its bytes} for one segment."""
        entries = self._constants.get(segment)
        if not isinstance(entries, dict):
            raise self._tampered(f"constants.json has no entry for segment {segment!r}")
        out = {}
        for fqn, e in entries.items():
            try:
                dtype, shape = DTYPES[e["dtype"]], tuple(int(d) for d in e["shape"])
                offset, length, rel = int(e["offset"]), int(e["bytes"]), e["file"]
            except (KeyError, TypeError, ValueError):
                raise self._tampered(f"constant {fqn!r} of segment {segment!r} is malformed") from None
            if rel not in self.build["weights"]:
                raise self._tampered(f"constant {fqn!r} of segment {segment!r} names {rel!r}, not a weight file")
            data = self._file(rel)
            numel = int(np.prod(shape, dtype=np.int64))
            if offset < 0 or min(shape, default=0) < 0 or length != numel * dtype.itemsize or offset + length > data.numel():
                raise self._tampered(f"constant {fqn!r} of segment {segment!r} points outside {e['file']!r} "
                                     f"or has the wrong size")
            try:
                out[fqn] = data[offset:offset + length].view(dtype).view(shape)
            except RuntimeError:  # an offset not aligned to the dtype
                raise self._tampered(f"constant {fqn!r} of segment {segment!r} is misaligned") from None
        return out

    def segment(self, key: str):
        """The loaded package of segment ``key``, its constants set (loaded once, then reused)."""
        loaded = self._loaded.get(key)
        if loaded is None:
            with self._lock:
                loaded = self._loaded.get(key)
                if loaded is None:
                    loaded = self._loaded[key] = self._load(key)
        return loaded

    def _load(self, key: str):
        arch = self.build["segments"].get(key)
        if arch not in self.build["packages"]:
            raise self._tampered(f"segment {key!r} has no package")
        index = self.device.index if self.device.type == "cuda" else -1
        try:
            loader = load_package(inside(self.root, self.build["packages"][arch]), index, self.single_threaded)
        except Exception as e:  # torch raises RuntimeError or zipfile/OS errors for a damaged package
            raise StitchError(f"{self.root}: cannot load AOTInductor package {self.build['packages'][arch]} "
                              f"({str(e).splitlines()[0][:160] if str(e) else e.__class__.__name__})") from None
        constants = self.constants(key)
        if set(constants) != set(loader.get_constant_fqns()):
            raise self._tampered(f"segment {key!r}: constants.json does not list exactly the package's constants")
        try:
            loader.load_constants(constants, False, True, True)  # active buffer, full update, user-managed
        except RuntimeError as e:
            raise self._tampered(f"segment {key!r}: {str(e).splitlines()[0][:160]}") from None
        return loader

    def chain(self, route: list[str], shapes: list, out_shape=None) -> Callable[[torch.Tensor], torch.Tensor]:
        """A config as the chain of its route's packages: device tensor in, device tensor out.

        ``shapes``: each segment's per-sample input shape; ``out_shape``: the last one's output,
        if known. A package reads whatever buffer it is given as the shape it was traced with, so
        a route whose segments do not fit (a tampered manifest) must stop here, not read past it.
        """
        steps = [(key, self.segment(key), tuple(shape)) for key, shape in zip(route, shapes, strict=True)]
        out_shape = None if out_shape is None else tuple(out_shape)

        def run(x: torch.Tensor) -> torch.Tensor:
            for key, loader, shape in steps:
                if x.shape[1:] != shape:
                    raise self._misfit(f"segment {key!r}", shape, x.shape)
                x = loader.run([x.contiguous()])[0]  # read as contiguous; may return another layout
            if out_shape is not None and x.shape[1:] != out_shape:
                raise self._misfit("the output", out_shape, x.shape)
            return x

        return run

    def _misfit(self, where: str, want: tuple, got) -> StitchError:
        return self._tampered(f"{where} takes [batch, {', '.join(map(str, want))}] but gets "
                              f"[{', '.join(map(str, got))}]")
