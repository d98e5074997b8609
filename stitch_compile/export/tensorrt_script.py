"""``tensorrt/build.sh``: the trtexec commands that build the engines on the device itself.

An engine only runs on the GPU model and TensorRT version that built it, so every bundle with the
tensorrt target carries this script, and where export has no TensorRT or GPU it is the way to get
engines at all: one trtexec command per config over the bundle's own graphs, all sharing one
timing cache, writing weight-stripped plans under ``tensorrt/$DEVICE_KEY/``. The script computes
the key with the same rule as ``engine_key``, so engines built either way land in the same place.
"""

from __future__ import annotations

import os
import re
import shlex

from .. import __version__

SCRIPT = "tensorrt/build.sh"
OPT_BATCH = 1  # the profile is tuned for single requests, the case a latency budget is about


def engine_key(gpu_name: str, trt_version: str, precision: str) -> str:
    """``<gpu>-trt<major.minor.patch>-<precision>`` as a slug; engines only run where all three match."""
    version = ".".join(trt_version.split(".")[:3])
    return re.sub(r"[^a-z0-9.]+", "-", f"{gpu_name}-trt{version}-{precision}".lower()).strip("-.")


# The same rule in POSIX sh (tr + sed), over "$GPU_NAME-trt$TRT_VERSION-<precision>".
_SH_KEY = ("printf '%s' \"$GPU_NAME-trt$TRT_VERSION-{precision}\" | tr 'A-Z' 'a-z' "
           "| sed -e 's/[^a-z0-9.][^a-z0-9.]*/-/g' -e 's/^[-.]*//' -e 's/[-.]*$//'")

_HEADER = """\
#!/bin/sh
# TensorRT engines for this stitch-compile bundle: {count} configs, {precision}, batch 1..{max_batch}.
# Written by stitch-compile {tool}. Run it on the device that will serve the engines: an engine
# only runs on the GPU model and TensorRT version that built it.
#
#   sh tensorrt/build.sh                  # needs trtexec (TensorRT 10.x or 11.x) and nvidia-smi
#   DRY_RUN=1 sh tensorrt/build.sh        # print the commands only
#   TRTEXEC=/usr/src/tensorrt/bin/trtexec GPU_NAME="NVIDIA L4" TRT_VERSION=10.3.0 sh tensorrt/build.sh
#
# Each engine is weight-stripped (--stripWeights: STRIP_PLAN + REFIT_IDENTICAL), so a plan holds
# kernels and no weights; it is refitted at load time from the graph's weights in onnx/ (the
# bundle's one weight store). All builds share one timing cache, so a layer that many configs
# contain is timed once. The profile covers batch 1..{max_batch}, tuned for batch {opt_batch}.
# {precision_note}
# Output: tensorrt/$DEVICE_KEY/config_<id>.plan and tensorrt/$DEVICE_KEY/timing.cache, where
# DEVICE_KEY = <gpu name>-trt<version>-{precision} as a slug, e.g. nvidia-l4-trt10.3.0-{precision}.
# The manifest does not hash these files: they are made on, and trusted by, the device.
set -eu
cd "$(dirname "$0")/.."
TRTEXEC="${{TRTEXEC:-trtexec}}"
GPU_NAME="${{GPU_NAME:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)}}"
if [ -z "${{TRT_VERSION:-}}" ]; then  # trtexec names its version in its first line: [TensorRT v100300]
  TRT_VERSION=$("$TRTEXEC" --help 2>&1 | sed -n 's/.*\\[TensorRT v\\([0-9][0-9]*\\)\\].*/\\1/p' | head -n 1 \\
    | awk '{{ if ($1 != "") printf "%d.%d.%d", int($1 / 10000), int($1 / 100) % 100, $1 % 100 }}')
fi
if [ -z "$GPU_NAME" ] || [ -z "$TRT_VERSION" ]; then
  echo "build.sh: cannot tell the GPU or the TensorRT version; set GPU_NAME and TRT_VERSION" >&2
  exit 2
fi
case "$TRT_VERSION" in [0-9].*)  # weight-stripped plans came with TensorRT 10
  echo "build.sh: TensorRT $TRT_VERSION is too old; these engines need TensorRT 10 or newer" >&2; exit 2 ;;
esac
{typing}DEVICE_KEY=$({key})
echo "building {count} engines into tensorrt/$DEVICE_KEY"
${{DRY_RUN:+echo}} mkdir -p "tensorrt/$DEVICE_KEY"
"""

_PRECISION = {
    "fp32": ("Precision fp32: --noTF32 keeps every float32 product in float32 (parity with PyTorch).",
             "", "--noTF32"),
    "fp16": ("Precision fp16: the graphs are onnx/config_<id>.fp16.onnx (float16 weights in onnx/weights.fp16.bin);\n"
             "# TensorRT 10 builds them as strongly typed networks (--stronglyTyped), TensorRT 11 always does.",
             'case "$TRT_VERSION" in 10.*) TYPING=--stronglyTyped ;; *) TYPING= ;; esac\n', "$TYPING"),
}


def write_build_script(root: str, graphs: dict[str, str], input_name: str, image_shape: list[int],
                       precision: str, max_batch: int) -> str:
    """Write ``tensorrt/build.sh`` (executable); its path in the bundle."""
    note, typing, flag = _PRECISION[precision]
    dims = "x".join(str(d) for d in image_shape)
    shapes = " ".join(f"--{kind}Shapes={input_name}:{batch}x{dims}"
                      for kind, batch in (("min", 1), ("opt", OPT_BATCH), ("max", max_batch)))
    lines = [_HEADER.format(count=len(graphs), precision=precision, max_batch=max_batch, opt_batch=OPT_BATCH,
                            tool=__version__, precision_note=note, typing=typing,
                            key=_SH_KEY.format(precision=precision))]
    common = f'--timingCacheFile="tensorrt/$DEVICE_KEY/timing.cache" {shapes} --stripWeights --skipInference {flag}'
    for n, (cid, rel) in enumerate(graphs.items(), 1):
        save = f'--saveEngine="tensorrt/$DEVICE_KEY/config_{cid}.plan"'
        lines.append(f'echo "[{n}/{len(graphs)}] config {cid}"\n'
                     f'${{DRY_RUN:+echo}} "$TRTEXEC" --onnx={shlex.quote(rel)} {save} {common}\n')
    lines.append('echo "done: tensorrt/$DEVICE_KEY/ (weight-stripped plans; the runtime refits them from onnx/)"\n')
    path = os.path.join(root, SCRIPT)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(lines))
    os.chmod(path, 0o755)
    return SCRIPT
