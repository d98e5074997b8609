#!/usr/bin/env bash
# Every GPU test and GPU benchmark in one run of under ten minutes, for a GPU machine lent for
# minutes: each step has its own time limit and saves its output under DIR as it goes, so a step
# that fails or runs out of time costs only itself.
#
#   bash benchmarks/gpu_check.sh [DIR]      # DIR defaults to gpu-results/
#
# Steps, most wanted first: AOTInductor per config with and without CUDA graphs at batch 1 and 64;
# the fused kernel's CUDA tests (both schedules, the tile schedule's waits included), then its
# check, sweep and time breakdown; the CLI's `bench` on the AOTInductor bundle, as a user runs it
# (it writes the LUT); the AOTInductor CUDA tests. The limits add up to 550 s (600 s at most with
# the 10 s each step may take to be killed). Pass DIR=$OUT on a
# lent machine, so that whatever finished comes back even if the command runs out of time.
# Needs stitch_compile importable (pip install -e ., or PYTHONPATH) and a CUDA device; runs
# $PYTHON (default python3).
set -u
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
dir=$(mkdir -p "${1:-gpu-results}" && cd "${1:-gpu-results}" && pwd)

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep stdout+stderr in DIR/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    # -k: SIGKILL 10 s after SIGTERM, which a process stuck in native code (a CUDA sync) never sees
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$dir/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]} (124: out of time), ${SECONDS} s since the start"
}

$py -c "import sys, torch, stitch_compile; torch.cuda.is_available() or sys.exit('gpu_check.sh: no CUDA device')" || exit 2
# the CUDA tests are mostly Triton and AOTInductor compiles: spread them over workers where pytest-xdist is installed
workers=$($py -c "import xdist" 2>/dev/null && echo "-n 8")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$dir/device.txt" 2>&1
step aoti 200 $py benchmarks/gpu.py --anchors 2 --batch 1,64 --runs 20 --warmup 5 \
    --work "$dir/work" --json "$dir/gpu.json"
step kernel-tests 55 $py -m pytest -q -rs $workers -k cuda tests/test_kernels.py
step kernels 130 $py benchmarks/kernels.py --check --sweep --breakdown --batch 64 --dtype fp16 --repeats 30
step cli 40 $py -m stitch_compile.cli bench "$dir/work/snnet_deit_ti_s.bundle" --device cuda:0 --cuda-graphs \
    --batch 1,64 --runs 10 --warmup 3 --quiet
# one test (a CPU export, then a CUDA export with graphs): worker startup would cost more than it saves
step aoti-tests 125 $py -m pytest -q -rs -k cuda tests/test_aoti.py
rm -rf "$dir/work"  # the exported bundle: large, and rebuilt by the next run
