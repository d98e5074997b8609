"""The ``aoti`` target: every segment compiled by torch.export + AOTInductor, weights kept out.

A config runs as the chain of its route's segment packages, as the ONNX Runtime ``segments`` mode
does, so compile cost grows with distinct segment *architectures*, not configs: all blocks of one
anchor share one package and differ only in constants (DeiT Ti/S/B: 13 packages for 71 configs).
Packages hold no weights (``aot_inductor.package_constants_in_so=False``). Their constants are
located in the ONNX weight store, where each Linear weight is stored transposed when a graph
needed it so; the modules are compiled in the store's layout so that the bytes match and nothing
is stored twice. Only tensors the store does not hold (e.g. BatchNorm folded away by the ONNX
exporter) go to ``aoti/<build key>/weights.bin``, reported as ``derived_bytes``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import torch
from torch import nn
from torch._inductor import aoti_compile_and_package
from tqdm import tqdm

from ..aotiweights import CONSTANTS_FORMAT, CONSTANTS_VERSION, DTYPE_NAMES, AotiPackages, build_key, load_package
from ..bundle import load_bundle, sha256_file, write_json
from ..errors import StitchError
from ..hardware import hardware_model, torch_device
from ..model.network import StitchableNet
from .parity import Reference, compare, within
from .weights import WeightStore

MAX_BATCH = 4096  # the exported batch dimension's range is 1..MAX_BATCH
INDUCTOR_CONFIGS = {"aot_inductor.package_constants_in_so": False}


class _TransposedLinear(nn.Module):
    """``nn.Linear`` holding ``weight.T``: the layout the ONNX exporter stored it in."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


def _numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype not in DTYPE_NAMES or t.dtype == torch.bfloat16:
        raise StitchError(f"aoti: constants of dtype {t.dtype} are not supported by this version")
    return t.detach().cpu().contiguous().numpy()


def store_layout(module: nn.Module, store: WeightStore, transposed: dict[int, bool]) -> nn.Module:
    """A copy of ``module`` whose Linear weights are transposed wherever the store holds them so.

    ``transposed`` remembers the answer per weight across calls: a stem or head segment's module
    holds its whole anchor, whose weights would otherwise be hashed again for every such segment.
    """
    # new module and parameter objects over the same storage: moving the copy to a device later
    # must not move the net's own parameters
    shared = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in module.parameters()}
    shared.update({id(b): b.detach() for b in module.buffers()})
    module_weights = {name: m.weight for name, m in module.named_modules() if type(m) is nn.Linear}
    module = copy.deepcopy(module, memo=shared)
    for name, child in list(module.named_modules()):
        if type(child) is nn.Linear:
            key = id(module_weights[name])
            if key not in transposed:
                weight = _numpy(child.weight)
                transposed[key] = store.find(weight) is None and store.find(np.ascontiguousarray(weight.T)) is not None
            if transposed[key]:
                parent_name, _, attr = name.rpartition(".")
                setattr(module.get_submodule(parent_name), attr, _TransposedLinear(child))
    return module.eval()


def _constants(program) -> dict[str, torch.Tensor]:
    """The tensors the graph reads (a segment's module may hold more, e.g. a whole anchor)."""
    sig, tensors = program.graph_signature, {**program.state_dict, **program.constants}
    used = [*sig.inputs_to_parameters.values(), *sig.inputs_to_buffers.values(),
            *sig.inputs_to_lifted_tensor_constants.values()]
    return {fqn: tensors[fqn] for fqn in used if isinstance(tensors.get(fqn), torch.Tensor)}


def architecture(program, in_shape) -> str:
    """Segments with equal graphs, input shapes and constant layouts share one compiled package."""
    h = hashlib.sha256(program.graph_module.code.encode())
    h.update(repr(tuple(in_shape)).encode())
    for fqn, t in sorted(_constants(program).items()):
        h.update(f"{fqn}:{t.dtype}:{tuple(t.shape)};".encode())
    return h.hexdigest()[:16]


def export_segment(module: nn.Module, in_shape, device: torch.device):
    """torch.export of one segment with a dynamic batch dimension (1..MAX_BATCH)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    x = torch.randn(2, *in_shape, device=device)
    with torch.no_grad():
        return torch.export.export(module.to(device), (x,), dynamic_shapes=({0: batch},), strict=False)


def build_aoti(net: StitchableNet, root: str, keys: list[str], store: WeightStore, device: str,
               quiet: bool, jobs: int | None = None) -> tuple[str, dict]:
    """Compile every segment architecture for ``device``; (build key, manifest entry)."""
    dev = torch_device(device)
    key = build_key(dev)
    rel_dir = f"aoti/{key}"
    os.makedirs(os.path.join(root, rel_dir))
    programs, segments, tensors, transposed = {}, {}, {}, {}
    for seg_key in tqdm(keys, desc="aoti export", disable=quiet, file=sys.stderr):
        seg = net.segments[seg_key]
        program = export_segment(store_layout(seg.module, store, transposed), seg.in_shape, dev)
        arch = architecture(program, seg.in_shape)
        programs.setdefault(arch, program)
        segments[seg_key], tensors[seg_key] = arch, _constants(program)
    packages = {arch: f"{rel_dir}/{arch}.pt2" for arch in programs}
    needed = compile_packages({arch: (programs[arch], os.path.join(root, rel)) for arch, rel in packages.items()},
                              jobs, quiet)
    derived = WeightStore(os.path.join(root, rel_dir, "weights.bin"), base=store)
    constants = {seg_key: {fqn: _locate(t, derived, rel_dir) for fqn, t in sorted(seg_tensors.items())
                           if fqn in needed[segments[seg_key]]}
                 for seg_key, seg_tensors in tensors.items()}
    derived.close()
    weights = ["onnx/weights.bin"]
    if derived.size:
        weights.append(f"{rel_dir}/weights.bin")
    else:
        os.unlink(derived.path)
    constants_rel = f"{rel_dir}/constants.json"
    write_json(os.path.join(root, constants_rel),
               {"format": CONSTANTS_FORMAT, "version": CONSTANTS_VERSION, "segments": constants})
    return key, {"device": dev.type, "hardware": hardware_model(dev), "torch": torch.__version__,
                 "max_batch": MAX_BATCH, "constants": constants_rel, "weights": weights,
                 "derived_bytes": derived.unique_bytes, "packages": packages, "segments": segments}


def default_jobs(packages: int) -> int:
    """Parallel compiles: one per two CPUs (each also runs the C++ compiler), at most 16."""
    return max(1, min(packages, (os.cpu_count() or 1) // 2, 16))


def compile_packages(work: dict[str, tuple], jobs: int | None, quiet: bool) -> dict[str, set[str]]:
    """Compile {arch: (program, package path)}; {arch: the constants the package reads}.

    With ``jobs`` > 1 the programs are saved and compiled by ``jobs`` worker processes at once:
    inductor's compile is mostly single-threaded C++/Triton compilation, and its config is global.
    """
    jobs = default_jobs(len(work)) if jobs is None else jobs
    with tqdm(total=len(work), desc="aoti compile", disable=quiet, file=sys.stderr) as bar:
        if jobs == 1 or len(work) == 1:
            needed = {}
            for arch, (program, path) in work.items():
                needed[arch] = compile_program(program, path)
                bar.update()
            return needed
        with tempfile.TemporaryDirectory(dir=os.path.dirname(next(iter(work.values()))[1])) as tmp:
            saved = {arch: os.path.join(tmp, f"{arch}.ep.pt2") for arch in work}
            for arch, (program, _) in work.items():  # torch.export.save is not thread-safe
                torch.export.save(program, saved[arch])
            return _compile_in_workers({arch: (saved[arch], path) for arch, (_, path) in work.items()}, jobs, bar)


def _compile_in_workers(work: dict[str, tuple[str, str]], jobs: int, bar) -> dict[str, set[str]]:
    """Compile {arch: (saved program, package path)} in ``jobs`` worker processes at once.

    If anything stops the parent (Ctrl-C, SIGTERM, the first compile that fails), the running
    workers are killed at once, with the C++ compilers they started (each worker leads its own
    process group): a compile takes minutes, and a SIGTERM sent to the parent alone never reaches them.
    """
    running, lock, stopping = set(), threading.Lock(), threading.Event()
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1"}  # the pool is the parallelism

    def compile_in_worker(arch: str) -> set[str]:
        with lock:
            if stopping.is_set():
                raise StitchError("aoti: compile stopped")
            proc = subprocess.Popen([sys.executable, "-m", "stitch_compile.export.aoti_worker", *work[arch]],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                    start_new_session=True)
            running.add(proc)
        try:
            out, err = proc.communicate()
        finally:
            with lock:
                running.discard(proc)
        if proc.returncode != 0:
            why = (err.strip().splitlines() or ["the worker died"])[-1]
            raise StitchError(f"aoti: compiling a segment failed: {why}")
        bar.update()
        return set(json.loads(out.strip().splitlines()[-1]))

    pool = ThreadPoolExecutor(jobs)
    try:
        futures = {pool.submit(compile_in_worker, arch): arch for arch in work}
        done = {futures[f]: f.result() for f in as_completed(futures)}  # the first failure raises at once
        return {arch: done[arch] for arch in work}
    except BaseException:
        with lock:
            stopping.set()
            for proc in running:
                if proc.returncode is None:  # not yet reaped: its pid still names its process group
                    os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def compile_program(program, path: str) -> set[str]:
    """Compile one exported program into an AOTInductor package; the constants it reads."""
    aoti_compile_and_package(program, package_path=path, inductor_configs=INDUCTOR_CONFIGS)
    return set(load_package(path).get_constant_fqns())  # inductor drops what the graph never reads


def _locate(t: torch.Tensor, derived: WeightStore, rel_dir: str) -> dict:
    """Where the constant's bytes are: its slot in the ONNX store, else a new one in the derived store."""
    array = _numpy(t)
    folder = "onnx" if derived.base.find(array) is not None else rel_dir
    location, offset, length = derived.add(array)
    return {"file": f"{folder}/{location}", "offset": offset, "bytes": length,
            "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)}


def check_aoti(ref: Reference, root: str, key: str, build: dict, ids: list[int], quiet: bool, rel_tol: float) -> dict:
    """Parity of every config's package chain (on its device) against the PyTorch net (on the CPU)."""
    dev = torch_device(build["device"])
    packages = AotiPackages(root, key, build, dev)
    results = {}
    for cid in tqdm(ids, desc=f"parity aoti {key}", disable=quiet, file=sys.stderr):
        route = ref.net.configs[cid].route
        chain = packages.chain(route, [ref.net.segments[key].in_shape for key in route])

        def run(x: np.ndarray, chain=chain) -> np.ndarray:
            return chain(torch.from_numpy(x).to(dev)).cpu().numpy()

        results[str(cid)] = compare(ref, cid, run)
    return within(results, f"aoti ({key})", rel_tol)


def keep_aoti_builds(out: str, tmp: str, key: dict, manifest: dict, parity: dict, report) -> None:
    """Carry the AOTInductor builds for other devices over from the bundle being replaced.

    Only from an intact bundle (hashes checked) of the same checkpoint, tool and configs whose
    weight store is byte-identical, so every carried constant still points at the right bytes.
    """
    if not os.path.isfile(os.path.join(out, "manifest.json")):
        return
    try:
        old = load_bundle(out, check_hashes=True)
        with open(old.path("parity.json"), encoding="utf-8") as f:
            old_parity = json.load(f)["targets"]
    except (StitchError, OSError, ValueError, KeyError, TypeError):
        return
    have = old.manifest
    if have.get("reuse_key") != key or "aoti" not in have["targets"]:
        return
    store = "onnx/weights.bin"
    if have["files"].get(store, {}).get("sha256") != sha256_file(os.path.join(tmp, store)):
        report(f"aoti: the weight store differs from {out}'s; its other AOTInductor builds are not kept")
        return
    builds = manifest["targets"]["aoti"]["builds"]
    for bk, entry in have["targets"]["aoti"]["builds"].items():
        if bk not in builds and f"aoti:{bk}" in old_parity:
            shutil.copytree(old.path(f"aoti/{bk}"), os.path.join(tmp, "aoti", bk))
            builds[bk] = entry
            parity["targets"][f"aoti:{bk}"] = old_parity[f"aoti:{bk}"]
            report(f"aoti: kept the build for {bk} from {out}")
