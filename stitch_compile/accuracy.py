"""Accuracy of every config, stored in the manifest (``configs[].accuracy``, top-1 %).

Two sources: the public training code's per-config results (JSON lines with ``cfg_id`` and
``acc1``, e.g. SN-Net's ``stitches_res.txt``; a later line for the same id wins, as that code
appends a line per evaluation), or a measurement with the runtime on an image folder (one
sub-folder per class, sorted folder names -> label ids). manifest.json is rewritten atomically
and only after the whole input was read and checked; it is not in the manifest's ``files``, so
no hash changes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys

import numpy as np
from tqdm import tqdm

from .bundle import MANIFEST, Bundle, load_bundle, same_export, write_json
from .errors import StitchError, first_line
from .images import is_image, load_image, unreadable_folder
from .runtime import Runtime



def read_results(path: str, bundle: Bundle) -> dict[int, float]:
    """{config id: top-1 %} from a JSON-lines results file; a bad line is an error naming it."""
    results = {}
    if not os.path.isfile(path):  # a pipe would block the read
        raise StitchError(f"{path}: no such results file (or not a regular file)")
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except (OSError, UnicodeDecodeError) as exc:
        raise StitchError(f"{path}: cannot read results ({exc})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:  # bad JSON, a 5000-digit number, deep nesting
            raise StitchError(f"{path}:{lineno}: not a JSON object ({first_line(exc)})") from None
        if not isinstance(record, dict) or "cfg_id" not in record or "acc1" not in record:
            raise StitchError(f"{path}:{lineno}: expected a JSON object with 'cfg_id' and 'acc1'")
        cid, acc = record["cfg_id"], record["acc1"]
        if not isinstance(cid, int) or isinstance(cid, bool) or cid not in bundle.configs:
            raise StitchError(f"{path}:{lineno}: cfg_id {cid!r} is not a config of this bundle")
        if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not (math.isfinite(acc) and 0 <= acc <= 100):
            raise StitchError(f"{path}:{lineno}: acc1 {acc!r} is not a top-1 accuracy in percent (0-100)")
        results[cid] = float(acc)
    if not results:
        raise StitchError(f"{path}: no results in the file")
    return results


def store_accuracy(bundle: Bundle, accuracy: dict[int, float], source: str) -> Bundle:
    """Rewrite manifest.json with ``accuracy`` merged in; other configs keep theirs."""
    manifest = copy.deepcopy(same_export(bundle, "accuracy", graphs=False).manifest)  # as on disk now
    for config in manifest["configs"]:
        if config["id"] in accuracy:
            config["accuracy"] = round(accuracy[config["id"]], 4)
    manifest["accuracy"] = {"metric": "top-1 %", "source": source}
    try:
        write_json(os.path.join(bundle.root, MANIFEST), manifest)
    except OSError as e:  # a read-only bundle folder
        raise StitchError(f"{bundle.root}: cannot update its manifest ({e.strerror or e})") from None
    return load_bundle(bundle.root)


def import_results(root: str, path: str) -> tuple[Bundle, dict[int, float]]:
    bundle = load_bundle(root)
    results = read_results(path, bundle)
    return store_accuracy(bundle, results, f"imported from {os.path.basename(path)}"), results


def image_folder(folder: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(image path, label)]): sub-folders sorted by name are the labels."""
    if not os.path.isdir(folder):
        raise StitchError(f"{folder}: no such image folder")
    try:
        names = os.listdir(folder)
        for name in names:  # a broken link to a class folder would shift every later class's label
            if not os.path.exists(os.path.join(folder, name)):
                raise StitchError(f"{os.path.join(folder, name)}: broken link; fix or remove it")
        classes = sorted(d for d in names if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))
        samples = [(os.path.join(folder, c, name), label) for label, c in enumerate(classes)
                   for name in sorted(os.listdir(os.path.join(folder, c))) if is_image(name)]
    except OSError as e:
        unreadable_folder(e)
    if not samples:
        raise StitchError(f"{folder}: no images found; expected one sub-folder of images per class")
    return classes, samples


def evaluate(runtime: Runtime, folder: str, batch: int = 32, normalize: bool = True, crop_pct: float = 0.875,
             quiet: bool = True) -> dict[int, float]:
    """Top-1 % of every config on ``folder``; each image is decoded once for all configs."""
    channels, *size = runtime.input_shape
    classes, samples = image_folder(folder)
    num_classes = runtime.bundle.manifest["output"]["shape"][-1]
    if channels != 3:
        raise StitchError(f"{runtime.bundle.root}: --eval reads RGB images; this bundle takes {channels} channels")
    if len(classes) > num_classes:
        raise StitchError(f"{folder}: {len(classes)} class folders, but the model has {num_classes} classes")
    if not 0 < crop_pct <= 1 or batch < 1:
        raise StitchError("--crop-pct must be in (0, 1] and --batch positive")
    correct = dict.fromkeys(runtime.config_ids, 0)
    with tqdm(total=len(samples), desc="eval", unit="img", disable=quiet, file=sys.stderr) as bar:
        for start in range(0, len(samples), batch):
            chunk = samples[start:start + batch]
            x = np.stack([load_image(p, tuple(size), crop_pct, normalize) for p, _ in chunk])
            labels = np.array([label for _, label in chunk])
            for cid in correct:
                correct[cid] += int((runtime.run(x, cid).argmax(axis=1) == labels).sum())
            bar.update(len(chunk))
    return {cid: 100.0 * n / len(samples) for cid, n in correct.items()}
