"""plot: every config as a point (latency or GFLOPs vs accuracy, or vs GFLOPs), frontier drawn.

Drawn with matplotlib's Agg canvas directly (no pyplot), so plotting never changes the caller's
matplotlib backend. Anchors are stars labelled with their names; predicted latencies are hollow.
"""

from __future__ import annotations

import os

from .bundle import Bundle, atomic_file
from .errors import StitchError, command
from .model.space import pareto_frontier
from .runtime.select import Selector


def points(bundle: Bundle, x: str, selector: Selector | None) -> tuple[dict, str, str]:
    """({id: (x, y, predicted)}, x label, y label); y is accuracy where known, else GFLOPs."""
    configs = bundle.configs
    has_accuracy = any("accuracy" in c for c in configs.values())
    if x == "latency":
        if selector is None:
            raise StitchError("plot --x latency needs a latency table")
        pts = {cid: (ch.latency_ms, configs[cid].get("accuracy", ch.flops / 1e9), ch.predicted)
               for cid, ch in selector.choices.items() if not has_accuracy or "accuracy" in configs[cid]}
        x_label = f"latency (ms, {selector.where.removeprefix('at ')})"
    elif x == "flops":
        if not has_accuracy:
            raise StitchError(f"{bundle.root}: no accuracy in the manifest to plot against GFLOPs; import it with "
                              f"`{command('accuracy', bundle.root, '--from', 'FILE')}` or plot --x latency")
        pts = {cid: (c["flops"] / 1e9, c["accuracy"], False) for cid, c in configs.items() if "accuracy" in c}
        x_label = "GFLOPs"
    else:
        raise StitchError(f"plot --x {x!r}: choose latency or flops")
    return pts, x_label, "top-1 accuracy (%)" if has_accuracy else "GFLOPs"


def is_png(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def plot(bundle: Bundle, out: str, x: str = "latency", selector: Selector | None = None, title: str = "") -> str:
    """Write the PNG to ``out`` (atomically) and return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not out or os.path.isdir(out):
        raise StitchError(f"-o {out!r}: expected the name of a PNG file to write")
    if bundle.holds(out):
        raise StitchError(f"{out}: is one of the bundle's own files; write the plot elsewhere")
    if os.path.exists(out) and not is_png(out):
        raise StitchError(f"{out}: exists and is not a PNG; plot replaces only an earlier plot")
    pts, x_label, y_label = points(bundle, x, selector)
    folder = os.path.dirname(os.path.realpath(out))  # through a symlink: where the plot will land
    if not os.path.isdir(folder):
        raise StitchError(f"{out}: folder {folder} does not exist")
    configs = bundle.configs
    anchors = {cid for cid in pts if len(configs[cid].get("anchors", [])) == 1}
    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for predicted, face in ((False, "tab:blue"), (True, "none")):
        sel = [(px, py) for cid, (px, py, p) in pts.items() if p == predicted and cid not in anchors]
        if sel:
            ax.scatter(*zip(*sel), s=18, facecolors=face, edgecolors="tab:blue",
                       label="stitched" + (" (predicted latency)" if predicted else ""))
    names = [a.get("name", f"anchor {i}") for i, a in enumerate(bundle.manifest["anchors"])]
    for cid in sorted(anchors):
        px, py, _ = pts[cid]
        ax.scatter([px], [py], marker="*", s=160, color="tab:red", zorder=3)
        ax.annotate(names[configs[cid]["anchors"][0]], (px, py), textcoords="offset points", xytext=(6, -10),
                    fontsize=8)
    frontier = ([c.id for c in selector.frontier()] if x == "latency"  # the one select --json shows
                else pareto_frontier({cid: (px, py) for cid, (px, py, _) in pts.items()}))
    ax.plot([pts[c][0] for c in frontier], [pts[c][1] for c in frontier], color="tab:orange", lw=1.2,
            drawstyle="steps-post", label="Pareto frontier")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title or f"{bundle.manifest['family']}: {len(pts)} configs", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    try:
        with atomic_file(out, binary=True) as f:
            fig.savefig(f, format="png")
    except OSError as e:  # a read-only folder, a full disk
        raise StitchError(f"{out}: cannot write the plot ({e.strerror or e})") from None
    return out
