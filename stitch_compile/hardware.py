"""Stable slugs naming the processor or GPU something was compiled for or measured on.

Shared by export (an AOTInductor build is only valid on the hardware it was compiled for) and the
runtime (a LUT is only valid where it was measured), so it lives beside both.
"""

from __future__ import annotations

import platform
import re

from .errors import StitchError

_NOISE = re.compile(r"\((r|tm|c)\)|\bcpu\b|\bprocessor\b|@.*$|\b\d+(\.\d+)?\s*ghz\b|\bwith\b.*$|\b\d+-core\b")


def slug(text: str, limit: int = 48) -> str:
    """Lower-case ``text`` to ``[a-z0-9.-]``, words joined by ``-``."""
    words = re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")
    return re.sub(r"-+", "-", words)[:limit].rstrip("-.") or "unknown"


def cpu_model() -> str:
    """The CPU's marketing name without trademarks, clock and core counts (``intel-xeon-platinum-8480c``)."""
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            name = next((line.split(":", 1)[1] for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    name = name.strip() or platform.processor() or platform.machine()
    return slug(_NOISE.sub(" ", name.lower()))


def torch_device(device: str):
    """``device`` ('cpu', 'cuda', 'cuda:N') as a torch.device, checked to exist here."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise StitchError(f"device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise StitchError(f"device {device!r}: no CUDA GPU is visible to torch on this machine")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise StitchError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        dev = torch.device("cuda", index)
    return dev


def hardware_model(device) -> str:
    """Slug of the CPU model, or of the GPU's name for a CUDA torch.device (``nvidia-h100-80gb-hbm3``)."""
    if device.type == "cuda":
        import torch

        return slug(torch.cuda.get_device_name(device))
    return cpu_model()
