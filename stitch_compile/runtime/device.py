"""Device keys: a stable slug naming where a latency table was measured.

A LUT is only meaningful for the hardware, backend (and its version), thread count and precision
it was measured with, so all of them go into the key, e.g.
``cpu-intel-xeon-platinum-8480c-ort1.32-t2-fp32``. The same machine and settings always give the
same key, so ``select`` finds the table ``bench`` wrote.
"""

from __future__ import annotations

import os
import re

from ..hardware import slug

_KEY = re.compile(r"(?P<device>[a-z]+)-.+-(?P<backend>[a-z]+)[0-9]+\.[0-9]+(?P<graphs>-graphs)?-t(?P<threads>[0-9]+)-[a-z0-9]+")


def default_threads() -> int:
    """CPUs this process may run on (its affinity mask), the natural intra-op thread count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_key(device: str, hardware: str, engine: str, threads: int, precision: str) -> str:
    """``<device>-<hardware>-<engine>-t<threads>-<precision>``; ``engine`` is e.g. ``ort1.32``."""
    return slug(f"{device}-{hardware}-{engine}-t{threads}-{precision}", limit=120)


def bench_options(key: str) -> list[str]:
    """The ``bench`` options that measure the table of device key ``key`` on its machine: device,
    threads, backend and its graph mode, read back from the key (none for a key it cannot read)."""
    m = _KEY.fullmatch(key)
    if m is None:
        return []
    options = ["--device", m["device"], "--threads", m["threads"]]
    if m["backend"] == "aoti":
        return options + ["--backend", "aoti"] + (["--cuda-graphs"] if m["graphs"] else [])
    return options + (["--mode", "graphs"] if m["graphs"] else [])
