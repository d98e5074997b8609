"""AOTInductor backend: every config resident as a chain of compiled segment packages.

The bundle's ``aoti`` build for this device (``export --targets aoti --device ...``) holds one
package per segment architecture and no weights; each segment is loaded once, its constants set to
views of the one copy of the weights (``aotiweights``), and a config runs as the chain of its
route, so switching configs loads nothing. On CUDA, ``cuda_graphs=True`` captures each config's
chain once per batch size (on first use) and replays it: one launch instead of one per kernel.

Runners take a numpy array (returned as numpy) or a torch tensor on the device (returned as a
device tensor after the stream is synchronised, which is what ``bench`` times).
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch

from ..aotiweights import AotiPackages, build_key, torch_minor
from ..bundle import Bundle
from ..errors import StitchError, command
from ..hardware import hardware_model, torch_device
from .backend import Backend, Runner


class AotiBackend(Backend):
    name = "aoti"

    def __init__(self, bundle: Bundle, device: str, threads: int, cuda_graphs: bool = False):
        self.torch_device = torch_device(device)
        super().__init__(bundle, self.torch_device.type, threads)  # 'cuda' and 'cuda:0' share one LUT key
        if cuda_graphs and self.torch_device.type != "cuda":
            raise StitchError("--cuda-graphs: CUDA graphs need a CUDA device")
        builds = bundle.manifest["targets"].get("aoti", {}).get("builds", {})
        self.build_key = build_key(self.torch_device)
        if self.build_key not in builds:
            have = ", ".join(builds) or "none"
            export = command("export", "CHECKPOINT", "--targets", "aoti", "--device", device, "--out", bundle.root)
            raise StitchError(f"{bundle.root}: no AOTInductor build for this device ({self.build_key}; the bundle "
                              f"has: {have}); run `{export}` on this machine")
        self.max_batch = builds[self.build_key]["max_batch"]
        self.packages = AotiPackages(bundle.root, self.build_key, builds[self.build_key], self.torch_device,
                                     single_threaded=cuda_graphs)  # graph runs are serialised by _Graphed
        self.cuda_graphs = cuda_graphs

    @property
    def version(self) -> str:
        return torch_minor()

    @property
    def engine(self) -> str:
        return super().engine + ("-graphs" if self.cuda_graphs else "")

    def hardware(self) -> str:
        return hardware_model(self.torch_device)

    def describe(self) -> dict:
        return {"build": self.build_key, "cuda_graphs": self.cuda_graphs,
                "input": "tensor already on the device" if self.torch_device.type == "cuda" else "host tensor"}

    def prepare(self, x: np.ndarray):
        return torch.from_numpy(x).to(self.torch_device)

    def segment_runner(self, key: str) -> Runner:
        return self._runner([key], out_shape=None)

    def config_runner(self, config_id: int) -> Runner:
        return self._runner(list(self.bundle.config(config_id)["route"]), self.bundle.manifest["output"]["shape"][1:])

    def _runner(self, route: list[str], out_shape) -> Runner:
        device, cuda = self.torch_device, self.torch_device.type == "cuda"
        shapes = [self.bundle.manifest["segments"][key]["in_shape"] for key in route]
        run = self.packages.chain(route, shapes, out_shape)
        if self.cuda_graphs:
            run = _Graphed(run, device)
        elif not cuda:
            run = _with_threads(run, self.threads)
        sample = tuple(shapes[0])

        def runner(x):
            # AOTInductor reads whatever buffer it is given as the traced shape, strides and dtype
            # (it checks nothing unless AOTI_RUNTIME_CHECK_INPUTS is set): a wrong one reads out of bounds
            host = isinstance(x, np.ndarray)
            if x.dtype != (np.float32 if host else torch.float32) or tuple(x.shape[1:]) != sample:
                raise StitchError(f"input {x.dtype} {list(x.shape)}: this runner takes float32 [batch, "
                                  f"{', '.join(map(str, sample))}]")
            if not 1 <= x.shape[0] <= self.max_batch:
                raise StitchError(f"batch {x.shape[0]}: this AOTInductor build takes batches of 1 to {self.max_batch}")
            # AOTInductor launches on the current device's current stream, not the runtime's device's
            with torch.cuda.device(device) if cuda else contextlib.nullcontext():
                if host:
                    return run(torch.from_numpy(np.ascontiguousarray(x)).to(device)).cpu().numpy()
                y = run(x.to(device).contiguous())
                if cuda:
                    torch.cuda.current_stream(device).synchronize()
                return y

        return runner


def _with_threads(run, threads: int):
    """``run`` with torch's intra-op thread count, which AOTInductor's CPU kernels use, at
    ``threads`` in the calling thread, then put back. The count is per-process state of the
    caller's, and runtimes with other counts may share the process: setting it once, when a
    runtime is made, ran every earlier runtime with the last one's count (and their tables' keys
    named another)."""
    def call(x):
        previous = torch.get_num_threads()  # the calling thread's OpenMP count
        if previous == threads:
            return run(x)
        torch.set_num_threads(threads)
        try:
            return run(x)
        finally:
            torch.set_num_threads(previous)

    return call


class _Graphed:
    """One config's chain captured as a CUDA graph per batch size, replayed under one lock.

    All graphs of a device share one memory pool, and all graphs of one input shape one static
    input (a batch of 64 224-px images is 38.5 MB: per config it would outweigh the weights), so
    replays must never overlap on the GPU: the lock (one for all) is held until the replay and the
    clone of its output have finished on the caller's stream. Releasing it once they are merely
    queued would let a caller on another stream start a replay over the same memory. Callers wait
    for the output anyway, so this costs no latency; it serialises replays, which the shared
    memory requires. The clone lets a later replay reuse the pool without clobbering what a caller
    holds.
    """

    _pools: dict = {}  # device -> (memory pool, the one stream that captures into it)
    _inputs: dict = {}  # (device, shape, dtype) -> the static input that every graph of it reads
    _lock = threading.Lock()

    def __init__(self, chain, device: torch.device):
        self.chain, self.device = chain, device
        self.graphs: dict[int, tuple] = {}

    def _capture(self, x: torch.Tensor) -> tuple:
        if self.device not in self._pools:
            self._pools[self.device] = torch.cuda.graph_pool_handle(), torch.cuda.Stream(self.device)
        # One capture stream per pool: the allocator reuses a pool's blocks only within a stream
        # (torch.cuda.graph's docs ask for the same stream with the same pool). Without one,
        # torch.cuda.graph captures on a process-wide stream of whichever device captured first.
        pool, stream = self._pools[self.device]
        key = (self.device, tuple(x.shape), x.dtype)
        static_in = self._inputs.get(key)
        if static_in is None:
            static_in = self._inputs[key] = torch.empty(x.shape, dtype=x.dtype, device=self.device)
        static_in.copy_(x)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up off the capture: lazy initialisation must not be recorded
                self.chain(static_in)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads' CUDA calls (e.g. a caller copying its output to the host)
        # stay legal during a capture; "global" would fail them or the capture
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            static_out = self.chain(static_in)
        return graph, static_in, static_out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # the device guard: the copies, replay and synchronisation use this device's current stream
        with self._lock, torch.cuda.device(self.device):
            entry = self.graphs.get(x.shape[0])
            if entry is None:
                entry = self.graphs[x.shape[0]] = self._capture(x)
            graph, static_in, static_out = entry
            static_in.copy_(x)
            graph.replay()
            y = static_out.clone()
            torch.cuda.current_stream(self.device).synchronize()
            return y
