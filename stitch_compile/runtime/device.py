"""Device keys: a stable slug naming where a latency table was measured.

A LUT is only meaningful for the hardware, backend (and its version), thread count and precision
it was measured with, so all of them go into the key, e.g.
``cpu-intel-xeon-platinum-8480c-ort1.32-t2-fp32``. The same machine and settings always give the
same key, so ``select`` finds the table ``bench`` wrote.
"""

from __future__ import annotations

import os
import platform
import re

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


def default_threads() -> int:
    """CPUs this process may run on (its affinity mask), the natural intra-op thread count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_key(device: str, hardware: str, engine: str, threads: int, precision: str) -> str:
    """``<device>-<hardware>-<engine>-t<threads>-<precision>``; ``engine`` is e.g. ``ort1.32``."""
    return slug(f"{device}-{hardware}-{engine}-t{threads}-{precision}", limit=120)
