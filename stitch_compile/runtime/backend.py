"""The small interface every inference backend implements, and the registry that finds them.

The Runtime, bench and accuracy code only ever ask a backend for *runners*: thread-safe callables
from a float32 numpy batch to a numpy array, one per config (resident once created) and one per
segment (for the latency model). A new backend (TensorRT engines, AOTInductor packages) is one
module here and one line in ``BACKENDS``; nothing else changes.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Callable

import numpy as np

from ..bundle import Bundle
from ..errors import StitchError

Runner = Callable[[np.ndarray], np.ndarray]

# name -> "module:class", imported on first use so unused engines are never loaded
BACKENDS = {"ort": "stitch_compile.runtime.ort_backend:OrtBackend",
            "aoti": "stitch_compile.runtime.aoti_backend:AotiBackend"}


class Backend(ABC):
    """One inference engine bound to one bundle, device and thread count."""

    name: str = ""
    precision: str = "fp32"

    def __init__(self, bundle: Bundle, device: str, threads: int):
        self.bundle, self.device, self.threads = bundle, device, threads

    @property
    @abstractmethod
    def version(self) -> str:
        """The engine's version; part of the device key."""

    @property
    def engine(self) -> str:
        """Backend, major.minor version and any mode that changes latency: the key's engine part."""
        return self.name + ".".join(self.version.split(".")[:2])

    @abstractmethod
    def hardware(self) -> str:
        """Slug of the processor or GPU the runners execute on; part of the device key."""

    @abstractmethod
    def config_runner(self, config_id: int) -> Runner:
        """A runner for one config: ``image`` [batch, C, H, W] -> ``logits``; the Runtime keeps it."""

    @abstractmethod
    def segment_runner(self, key: str) -> Runner:
        """A runner for one segment graph (``x`` -> ``y``), used to time it for the latency model."""

    def describe(self) -> dict:
        """What the LUT records about how this backend ran (target, options)."""
        return {}

    def prepare(self, x: np.ndarray):
        """``x`` as runners take it fastest (e.g. already on the GPU); bench times runners on this."""
        return x


def default_backend(device: str) -> str:
    """ONNX Runtime runs on the CPU here; CUDA devices get the AOTInductor packages."""
    return "aoti" if str(device).startswith("cuda") else "ort"


def create_backend(name: str, bundle: Bundle, device: str, threads: int, **options) -> Backend:
    """An instance of backend ``name``; ``options`` are that backend's own keyword arguments."""
    if name not in BACKENDS:
        raise StitchError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(bundle, device, threads, **options)
