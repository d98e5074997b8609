"""Safe reading of SN-Net-family checkpoints.

Checkpoints are untrusted: they are read with ``torch.load(weights_only=True)`` and only
``argparse.Namespace`` (which the public training code stores under ``args``) is allow-listed, so
a pickle that needs any other global is refused before its payload can run. The one exception is a
training framework's config object saved beside the weights (SN-Net Swin stores a yacs
``CfgNode`` under ``config``): such a file is re-read by a restricted unpickler that admits
torch's own weights-only globals plus those config classes, rebuilt as plain dicts, never their
code. Saving writes the same container the public code writes, atomically.
"""

from __future__ import annotations

import argparse
import os
import pickle
import types
import warnings
import zipfile

import torch
from torch import nn

from ..bundle import atomic_file
from ..errors import StitchError, first_line

# Containers the public training code writes, most specific first (SNNET_FORMATS.md).
CONTAINER_KEYS = ("model", "state_dict", "state_dict_ema")
# Config classes of training frameworks found beside the weights; read as dicts of their items.
FOREIGN_CONFIGS = ("yacs.config.CfgNode",)


class ForeignConfig(dict):
    """A foreign config object as data: its items (and attributes), none of its code."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits torch's weights-only globals, argparse.Namespace and FOREIGN_CONFIGS; nothing else."""

    def find_class(self, module: str, name: str):
        qualified = f"{module}.{name}"
        if qualified in FOREIGN_CONFIGS:
            return ForeignConfig
        if qualified == "argparse.Namespace":
            return argparse.Namespace
        allowed = torch._weights_only_unpickler._get_allowed_globals()
        if qualified in allowed:
            return allowed[qualified]
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {qualified}")


_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="stitch_compile.restricted_pickle", Unpickler=_RestrictedUnpickler,
    load=lambda f, **kw: _RestrictedUnpickler(f, **kw).load())


def _torch_load(path: str):
    """torch.load, weights only; retried with the restricted unpickler for foreign config objects."""
    # torch warns (multi-line, on stderr) about foreign pickle protocols; errors below say it once
    with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if not any(name in str(exc) for name in FOREIGN_CONFIGS):
                raise
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE)


def _load_object(path: str):
    if not os.path.exists(path):
        raise StitchError(f"{path}: no such file; pass the path of a checkpoint written by torch.save")
    if os.path.isdir(path):
        raise StitchError(f"{path}: is a folder; pass the checkpoint file itself")
    if not os.path.isfile(path):  # a pipe or device would block the read or never end
        raise StitchError(f"{path}: not a regular file; pass the checkpoint file itself")
    try:
        return _torch_load(path)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise StitchError(
                f"{path}: refused to unpickle: the checkpoint needs arbitrary code ({_unsupported_global(exc)}); "
                "only tensors, containers and argparse.Namespace are loaded"
            ) from None
        raise StitchError(f"{path}: not a torch checkpoint: torch.load cannot read it") from None
    except Exception as exc:  # junk bytes make torch's unpickler raise KeyError, IndexError, ... too
        if zipfile.is_zipfile(path) or starts_with_zip_magic(path):
            raise StitchError(f"{path}: truncated or corrupt torch file ({first_line(exc)}); re-copy or re-save it") from None
        raise StitchError(f"{path}: not a torch checkpoint (torch.load failed: {first_line(exc)})") from None


def _unsupported_global(exc: Exception) -> str:
    for line in str(exc).splitlines():
        if "Unsupported global" in line or "GLOBAL" in line:
            return line.strip().split(" was not an allowed global")[0].rstrip(".")
    return first_line(exc)


def starts_with_zip_magic(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _is_state_dict(obj) -> bool:
    return (isinstance(obj, dict) and bool(obj)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _oddity(t: torch.Tensor) -> str | None:
    """What makes ``t`` no weight tensor of a trained network, if anything."""
    if t.device.type != "cpu":  # map_location moves real devices, not meta
        return f"a {t.device.type} tensor"
    if t.layout != torch.strided:
        return f"a {t.layout} tensor"
    if t.dtype == torch.bool or t.is_complex():
        return f"of dtype {t.dtype}"
    if t.numel() == 0:
        return f"empty (shape {list(t.shape)})"
    if t.is_floating_point() and not torch.isfinite(t).all():
        return "holding NaN or Inf: the checkpoint is corrupt or its training diverged"
    return None


def _check_tensors(path: str, state: dict[str, torch.Tensor]) -> None:
    """Refuse what loading would copy silently (bool, complex, NaN) or fail on with a traceback
    (meta, sparse, empty): a trained network's state dict holds none of them."""
    for key, t in state.items():
        odd = _oddity(t)
        if odd:
            raise StitchError(f"{path}: tensor {key} is {odd}; expected the dense, finite weights of a trained network")


def read_state_dict(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """Return (state dict, container key or 'bare') of the checkpoint at ``path``."""
    obj = _load_object(path)
    if isinstance(obj, dict):
        for key in (*CONTAINER_KEYS, None):
            state = obj if key is None else obj.get(key)
            if _is_state_dict(state):
                _check_tensors(path, state)
                return _strip_module_prefix(state), key or "bare"
        keys = ", ".join(sorted(map(str, obj))[:8])
        raise StitchError(
            f"{path}: unknown checkpoint layout: expected a state dict under one of "
            f"{', '.join(repr(k) for k in CONTAINER_KEYS)} or a bare state dict; found keys: {keys}"
        )
    raise StitchError(f"{path}: unknown checkpoint layout: expected a dict, found {type(obj).__name__}")


def _strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints saved from DistributedDataParallel prefix every key with 'module.'."""
    if all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def save_checkpoint(net_or_state: nn.Module | dict[str, torch.Tensor], path: str,
                    args: argparse.Namespace | None = None) -> None:
    """Write the public SN-Net container (``model``, ``optimizer``, ``epoch``, ``args``) to ``path``.

    The file is written beside ``path`` and renamed over it, so a failed or interrupted save never
    leaves a truncated checkpoint and never destroys the file already there.
    """
    state = net_or_state.state_dict() if isinstance(net_or_state, nn.Module) else net_or_state
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise StitchError(f"{path}: folder {folder} does not exist; create it first")
    if os.path.isdir(path):
        raise StitchError(f"{path}: is a folder; pass the checkpoint file name to write")
    if os.path.exists(path) and not os.path.isfile(path):  # a rename would replace a device or pipe
        raise StitchError(f"{path}: exists and is not a regular file; pass a checkpoint file name to write")
    container = {
        "model": {k: v.detach().cpu().contiguous() for k, v in state.items()},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 0,
        "args": args if args is not None else argparse.Namespace(),
    }
    try:
        with atomic_file(path, binary=True) as f:
            torch.save(container, f)
    except OSError as e:  # a read-only folder, a full disk
        raise StitchError(f"{path}: cannot write the checkpoint ({e.strerror or e})") from None
