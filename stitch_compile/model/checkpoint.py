"""Safe reading of SN-Net-family checkpoints.

Checkpoints are untrusted: they are read with ``torch.load(weights_only=True)`` and only
``argparse.Namespace`` (which the public training code stores under ``args``) is allow-listed, so
a pickle that needs any other global is refused before its payload can run.
"""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile

import torch

from ..errors import StitchError

# Containers the public training code writes, most specific first (SNNET_FORMATS.md).
CONTAINER_KEYS = ("model", "state_dict", "state_dict_ema")


def _load_object(path: str):
    if not os.path.exists(path):
        raise StitchError(f"{path}: no such file; pass the path of a checkpoint written by torch.save")
    if os.path.isdir(path):
        raise StitchError(f"{path}: is a folder; pass the checkpoint file itself")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise StitchError(
                f"{path}: refused to unpickle: the checkpoint needs arbitrary code ({_unsupported_global(exc)}); "
                "only tensors, containers and argparse.Namespace are loaded"
            ) from None
        raise StitchError(f"{path}: not a torch checkpoint: torch.load cannot read it") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        if zipfile.is_zipfile(path) or _starts_with_zip_magic(path):
            raise StitchError(f"{path}: truncated or corrupt torch file ({_first_line(exc)}); re-copy or re-save it") from None
        raise StitchError(f"{path}: not a torch checkpoint (torch.load failed: {_first_line(exc)})") from None


def _unsupported_global(exc: Exception) -> str:
    for line in str(exc).splitlines():
        if "Unsupported global" in line or "GLOBAL" in line:
            return line.strip().split(" was not an allowed global")[0].rstrip(".")
    return _first_line(exc)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__


def _starts_with_zip_magic(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_state_dict(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """Return (state dict, container key or 'bare') of the checkpoint at ``path``."""
    obj = _load_object(path)
    if isinstance(obj, dict):
        for key in CONTAINER_KEYS:
            if _is_state_dict(obj.get(key)):
                return _strip_module_prefix(obj[key]), key
        if _is_state_dict(obj):
            return _strip_module_prefix(obj), "bare"
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
