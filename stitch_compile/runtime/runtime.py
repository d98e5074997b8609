"""Runtime: every config of a bundle resident at once, selected by latency budget, run by id.

    rt = Runtime("bundle/", device="cpu")   # every config resident, one copy of the weights
    cid = rt.select(budget_ms=25)           # best config that fits, from this device's LUT
    y = rt.run(x, config=cid)               # numpy in, numpy out; thread-safe

Runners are created once (all up front, or on first use with ``preload=False``) and never
reloaded, so a switch is a dictionary lookup; ``select`` is a binary search over a table built
once per (metric, batch).
"""

from __future__ import annotations

import os
import threading

import numpy as np

from ..bundle import Bundle, load_bundle
from ..errors import StitchError, exact_int
from .backend import Backend, Runner, create_backend, default_backend
from .device import default_threads, device_key
from .lut import Lut, available, read_lut
from .select import Choice, Selector


class Runtime:
    """Load a bundle for one device; ``backend`` defaults to ort on the CPU and aoti on CUDA;
    ``backend_options`` go to the backend (ort: ``mode``; aoti: ``cuda_graphs``).
    ``check_hashes`` re-hashes every file of the bundle first, as ``verify`` does (1.4 s
    per GB here): for a bundle that arrived over a channel nobody checked."""

    def __init__(self, bundle: str | Bundle, device: str = "cpu", backend: str | None = None,
                 threads: int | None = None, preload: bool = True, check_hashes: bool = False, **backend_options):
        given = isinstance(bundle, Bundle)
        self.bundle = bundle if given and not check_hashes else load_bundle(bundle.root if given else bundle, check_hashes)
        cpus = os.cpu_count() or 1  # more threads than CPUs only contend (and 10^5 of them hang)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cpus):
            raise StitchError(f"threads {threads!r}: expected 1 to {cpus}, the CPUs of this machine")
        self.threads = threads or default_threads()
        self.backend: Backend = create_backend(backend or default_backend(device), self.bundle, device, self.threads,
                                               **backend_options)
        self.device_key = device_key(self.backend.device, self.backend.hardware(), self.backend.engine, self.threads,
                                     self.backend.precision)
        self.input_shape = tuple(self.bundle.manifest["input"]["shape"][1:])
        self._runners: dict[int, Runner] = {}
        self._selectors: dict[tuple, Selector] = {}
        self._lut: Lut | None = None
        self._lock = threading.Lock()
        if preload:
            for cid in self.config_ids:
                self.runner(cid)

    @property
    def config_ids(self) -> list[int]:
        return [c["id"] for c in self.bundle.manifest["configs"]]

    def runner(self, config) -> Runner:
        """The resident runner of ``config`` (created on first use when not preloaded)."""
        # fast path for a plain int only: True and 3.0 hash like 1 and 3 but are not ids
        runner = self._runners.get(config) if type(config) is int else None
        if runner is None:
            cid = int(self.bundle.config(config)["id"])
            with self._lock:
                runner = self._runners.get(cid)
                if runner is None:
                    runner = self._runners[cid] = self.backend.config_runner(cid)
        return runner

    def run(self, x, config) -> np.ndarray:
        """Logits of ``config`` for the image batch ``x`` [batch, C, H, W] (float32)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != self.input_shape or x.shape[0] < 1:
            shape = ", ".join(map(str, self.input_shape))
            raise StitchError(f"input of shape {list(x.shape)}: this bundle takes [batch, {shape}]")
        return self.runner(config)(x)

    @property
    def lut(self) -> Lut:
        """This device's latency table (read and validated once)."""
        if self._lut is None:
            self._lut = read_lut(self.bundle, self.device_key, self._other_threads())
        return self._lut

    @lut.setter
    def lut(self, lut: Lut) -> None:
        """Select from ``lut`` from now on (``bench`` hands over the table it has just written)."""
        with self._lock:
            self._lut, self._selectors = lut, {}

    def _other_threads(self) -> str:
        """The usual miss is a table of this machine measured with another thread count (the demo
        measures 1 thread), which --threads selects at once."""
        have, hardware = set(available(self.bundle)), self.backend.hardware()
        for t in range(1, (os.cpu_count() or 1) + 1):
            if device_key(self.backend.device, hardware, self.backend.engine, t, self.backend.precision) in have:
                return f", or pass --threads {t} to use the table already measured with it"
        return ""

    def selector(self, metric: str = "p50", batch: int = 1) -> Selector:
        """The selection table for one latency metric and batch size (built once)."""
        # a plain int as is (the switch's hot path); True would share batch 1's cached table
        key = (metric, batch if type(batch) is int else exact_int(batch))
        selector = self._selectors.get(key)
        if selector is None:
            with self._lock:
                selector = self._selectors.get(key) or Selector(
                    self.bundle.configs, self.lut.table(batch, metric),
                    f"at {metric} (batch {batch}) on {self.device_key}")
                self._selectors[key] = selector
        return selector

    def select(self, budget_ms: float, metric: str = "p50", batch: int = 1) -> int:
        """Id of the most accurate config (else the most FLOPs) whose latency fits ``budget_ms``."""
        return self.selector(metric, batch).select(budget_ms)

    def choice(self, budget_ms: float, metric: str = "p50", batch: int = 1) -> Choice:
        """``select``, with the chosen config's latency, accuracy and FLOPs."""
        selector = self.selector(metric, batch)
        return selector.choices[selector.select(budget_ms)]
