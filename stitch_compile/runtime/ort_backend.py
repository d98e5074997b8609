"""ONNX Runtime backend (CPU execution provider): every config resident over one copy of the weights.

Two execution modes; in both, switching configs loads nothing.

``segments`` (default): one session per unique segment graph; a config runs as the chain of its
route, OrtValues passed from session to session. ONNX Runtime spends ~6 KB of heap per graph node
per session (kernels, plans, shape info: ~2 MB per DeiT config graph), so this pays it once per
segment instead of once per config, and pre-packs (MLAS's GEMM layout) each weight exactly once.
The original weight pages are then released, so the packed copy is the only resident one. The
weights end up private to the process.

``graphs``: one session per config graph (the ``ort`` target, already optimised offline, so graph
optimisations stay off and cannot fold private copies of weights). Pre-packing is disabled: the
CPU EP packs MatMul weights per session, a private copy in every session. Weights stay shared file
pages (shared between processes too), but every session carries its own graph.

All sessions share one memory arena (a per-session arena keeps every session's peak activations
resident). Each session has its own intra-op pool of ``threads`` threads that do not spin when
idle: a spinning pool keeps burning its cores after its run, right when the next segment's (or
the next config's) pool needs them. ORT's global thread pool would avoid the extra pools, but once
created it makes every other session of the process that does not opt in fail, so a library
cannot impose it. Measurements behind these choices: docs/runtime.md.
"""

from __future__ import annotations

import threading

import onnxruntime as ort

from ..bundle import Bundle
from ..errors import StitchError
from ..ortweights import SharedWeights
from .backend import Backend, Runner
from ..hardware import cpu_model

MODES = ("segments", "graphs")
_arena = {"registered": False}
_arena_lock = threading.Lock()


def _share_arena() -> None:
    """Register one CPU arena for the whole process (sessions opt in with use_env_allocators)."""
    with _arena_lock:
        if not _arena["registered"]:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, None)
            _arena["registered"] = True


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, bundle: Bundle, device: str, threads: int, mode: str = "segments"):
        if device != "cpu":
            raise StitchError(f"device {device!r}: the ort backend runs on 'cpu' only; "
                              f"use --backend aoti (backend=\"aoti\") for a GPU")
        if mode not in MODES:
            raise StitchError(f"unknown ort mode {mode!r}; choose from {', '.join(MODES)}")
        super().__init__(bundle, device, threads)
        self.mode = mode
        self.target = "ort" if "ort" in bundle.manifest["targets"] else "onnx"
        self.weights = SharedWeights(bundle.path("onnx"))
        _share_arena()
        self._segments: dict[str, ort.InferenceSession] = {}
        self._lock = threading.Lock()

    @property
    def version(self) -> str:
        return ort.__version__

    @property
    def engine(self) -> str:
        return super().engine + ("-graphs" if self.mode == "graphs" else "")

    def hardware(self) -> str:
        return cpu_model()

    def describe(self) -> dict:
        return {"mode": self.mode, "target": self.target if self.mode == "graphs" else "segments",
                "prepack": self.mode == "segments", "thread_pool": "per session, no spinning",
                "arena": "shared"}

    def _options(self, optimize: bool) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if optimize
                                            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        options.log_severity_level = 3
        options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.use_env_allocators", "1")
        if self.mode == "graphs":
            options.add_session_config_entry("session.disable_prepacking", "1")
        return options

    def _segment(self, key: str) -> ort.InferenceSession:
        session = self._segments.get(key)
        if session is None:
            with self._lock:
                session = self._segments.get(key)
                if session is None:
                    rel = self.bundle.manifest["segments"][key]["file"]
                    session = self.weights.session(self.bundle.path(rel), self._options(optimize=True))
                    if self.mode == "segments":
                        self.weights.release_pages()  # the session keeps pre-packed copies
                    self._segments[key] = session
        return session

    def segment_runner(self, key: str) -> Runner:
        session = self._segment(key)
        return lambda x: session.run(["y"], {"x": x})[0]

    def config_runner(self, config_id: int) -> Runner:
        if self.mode == "graphs":
            if str(config_id) not in self.bundle.manifest["targets"][self.target]["graphs"]:
                raise StitchError(f"{self.bundle.root}: config {config_id} has no {self.target} graph; "
                                  f"the bundle is tampered")
            graph = self.bundle.graph(self.target, config_id)
            session = self.weights.session(graph, self._options(optimize=self.target != "ort"))
            return lambda x: session.run(["logits"], {"image": x})[0]
        route = self.bundle.config(config_id)["route"]
        chain = [self._segment(key) for key in route]
        io = dict(zip(route, ((s.get_inputs()[0].shape, s.get_outputs()[0].shape) for s in chain)))
        self.bundle.check_route(config_id, io.__getitem__)  # here, not as ORT's error at every run

        def run(x):
            value = ort.OrtValue.ortvalue_from_numpy(x)
            for session in chain:
                value = session.run_with_ort_values(["y"], {"x": value})[0]
            return value.numpy()

        return run
