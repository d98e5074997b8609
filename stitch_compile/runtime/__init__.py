"""Load a bundle, select a config for a latency budget, run it (one module per backend).

Never imports export: the runtime reads bundles through ``bundle`` and ``ortweights`` only.
"""

from .backend import BACKENDS, Backend, create_backend
from .lut import Lut, read_lut
from .runtime import Runtime
from .select import Choice, Selector

__all__ = ["BACKENDS", "Backend", "Choice", "Lut", "Runtime", "Selector", "create_backend", "read_lut"]
