"""Target ``tensorrt`` where TensorRT (10.x or 11.x) and a CUDA GPU are present: one engine per config.

Each config's graph is parsed by TensorRT's ONNX parser and built weight-stripped (STRIP_PLAN +
REFIT_IDENTICAL): a plan holds kernels only, so a bundle keeps one copy of the weights however
many configs and devices it serves, and ``load_engine`` refits a plan from its graph, whose
initializers are external data in the shared store. All builds share one timing cache (a block
that many configs contain is timed once), saved beside the engines. fp16 comes from the graph:
TensorRT 11 dropped the FP16 builder flag, so the fp16 graph variant is built as a strongly
typed network (an explicit flag on 10.x, always so on 11.x). ``tensorrt`` is imported inside the
functions; export only calls them when ``targets.unavailable_reason("tensorrt")`` is None.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from ..errors import StitchError
from .parity import Reference, compare, tolerance, within
from .tensorrt_script import OPT_BATCH, engine_key


def build_engines(root: str, graphs: dict[str, str], input_name: str, image_shape: list[int],
                  precision: str, max_batch: int, quiet: bool) -> dict:
    """Build ``tensorrt/<device key>/config_<id>.plan`` for every graph; the manifest fields."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    version = trt.__version__
    key = engine_key(torch.cuda.get_device_name(), version, precision)
    folder = f"tensorrt/{key}"
    os.makedirs(os.path.join(root, folder))
    typed = precision == "fp16" and int(version.split(".")[0]) < 11
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typed else 0
    shapes = [(batch, *image_shape) for batch in (1, OPT_BATCH, max_batch)]
    cache, engines = None, {}
    for cid, rel in tqdm(graphs.items(), desc="tensorrt engines", disable=quiet, file=sys.stderr):
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(os.path.join(root, rel)):
            raise StitchError(f"{rel}: TensorRT's ONNX parser rejected it: {parser.get_error(0)}")
        config = builder.create_builder_config()
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
        if precision == "fp32":
            config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32 products: parity with PyTorch
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, *shapes)
        config.add_optimization_profile(profile)
        if cache is None:
            cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise StitchError(f"{rel}: TensorRT could not build an engine (its log above says why)")
        engines[cid] = f"{folder}/config_{cid}.plan"
        with open(os.path.join(root, engines[cid]), "wb") as f:
            f.write(plan)
    with open(os.path.join(root, folder, "timing.cache"), "wb") as f:
        f.write(cache.serialize())
    return {"engines": engines, "device_key": key, "tensorrt_version": version,
            "timing_cache": f"{folder}/timing.cache"}


def load_engine(runtime, logger, plan_path: str, graph_path: str):
    """Deserialize a weight-stripped plan and refit it from its graph's weights (the shared store)."""
    import tensorrt as trt

    with open(plan_path, "rb") as f:
        engine = runtime.deserialize_cuda_engine(f.read())
    if engine is None:
        raise StitchError(f"{plan_path}: TensorRT cannot load this engine; was it built for another GPU or "
                          "TensorRT version? Rebuild it with tensorrt/build.sh on this device")
    refitter = trt.Refitter(engine, logger)
    parser = trt.OnnxParserRefitter(refitter, logger)  # owns the weights it hands over: alive until the commit
    if not parser.refit_from_file(graph_path) or not refitter.refit_cuda_engine():
        raise StitchError(f"{plan_path}: refitting its weights from {graph_path} failed; the graph and the "
                          "engine do not match, rebuild the engine")
    return engine


class _EngineSession:
    """An engine as the ``run(image) -> logits`` callable that parity.compare takes."""

    def __init__(self, engine):
        self.context = engine.create_execution_context()

    def __call__(self, array: np.ndarray) -> np.ndarray:
        name, output = "image", "logits"  # the bundle graphs' input and output names
        x = torch.from_numpy(array).cuda()
        self.context.set_input_shape(name, tuple(x.shape))
        y = torch.empty(tuple(self.context.get_tensor_shape(output)), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(name, x.data_ptr())
        self.context.set_tensor_address(output, y.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise StitchError("TensorRT failed to run an engine during the parity check")
        stream.synchronize()
        return y.cpu().numpy()


def check_engines(ref: Reference, root: str, target: dict, quiet: bool) -> dict:
    """Parity of every refitted engine against PyTorch, at the target's precision tolerance."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    results = {}
    for cid, rel in tqdm(target["engines"].items(), desc="parity tensorrt", disable=quiet, file=sys.stderr):
        engine = load_engine(runtime, logger, os.path.join(root, rel), os.path.join(root, target["graphs"][cid]))
        results[cid] = compare(ref, int(cid), _EngineSession(engine))
    return within(results, "tensorrt", tolerance(target))
