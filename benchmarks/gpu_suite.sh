#!/usr/bin/env bash
# The GPU suite (issue 35): everything a lent H100/H200 should run, in one command that finishes
# within 8 minutes, shortest parts first so that a run cut off early still returns numbers.
#
#   bash benchmarks/gpu_suite.sh --prepare     on the CPU machine, once: fills .whl/ (the wheels the GPU
#                                              machine lacks: diffusers, mamba-ssm, pytest, pydantic)
#   bash benchmarks/gpu_suite.sh               on the GPU machine (carry .whl/): results in $OUT
#   bash benchmarks/gpu_suite.sh --cpu-smoke   here, on CPU, reduced sizes: checks the suite itself
#
# Writes to $OUT (default out/gpu_suite): suite.log (everything printed, nvidia-smi first) and
# bench_scan.json, bench_layer.json, bench_step.json (bench_gpu.py's raw numbers, one per section).
# benchmarks/RESULTS.md says how to run it through the device tool and what to record.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-gpu}

if [ "$mode" = "--prepare" ]; then
    set -e
    bash ../shared/gpu/make-wheels.sh
    # pure-Python wheels for the GPU machine's Python 3.12, plus pydantic's compiled core
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl pytest pluggy iniconfig "pydantic==$(python3 -c 'import pydantic; print(pydantic.VERSION)')" \
        "pydantic-core==$(python3 -c 'import pydantic_core; print(pydantic_core.__version__)')" \
        annotated-types typing-inspection
    ls .whl
    exit 0
fi

OUT=${OUT:-out/gpu_suite}
mkdir -p "$OUT"
log="$OUT/suite.log"
: > "$log"
say() { echo "$@" | tee -a "$log"; }
run() {  # run LIMIT_SECONDS CMD...: output into the log; a part that fails or times out does not stop the rest
    local limit=$1; shift
    say "\$ $*"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || say "(exit status $rc$([ "$rc" = 124 ] && echo ": stopped after ${limit} s"))"
}

if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl 2>&1 | tail -3 | tee -a "$log"
    export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
say "gpu_suite $mode $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total,memory.used --format=csv 2>&1 \
    | tee -a "$log" || say "no nvidia-smi"
python3 - << 'EOF' 2>&1 | tee -a "$log"
import torch
import m4v_convert.ops as ops, m4v_convert.ops.gated_rmsnorm as norm
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0)
      if torch.cuda.is_available() else "none")
print("kernels: scan", ops.triton_scan_available() or ops.triton_scan_error(),
      "| gated norm", norm.triton_rmsnorm_available() or norm.triton_rmsnorm_error())
EOF

if [ "$mode" = "--cpu-smoke" ]; then
    # the same parts at reduced sizes: the tests (skipped without CUDA), then each benchmark section
    run 300 python3 -m pytest -q -rs -m gpu tests/test_gpu.py tests/test_ssd_scan.py
    for section in scan layer step; do
        run 300 python3 benchmarks/bench_gpu.py --cpu-small --device cpu --sections "$section" \
            --json "$OUT/bench_$section.json"
    done
elif [ "$mode" = "gpu" ]; then
    # 1. correctness first (compiles and autotunes the kernels: the benchmarks then start warm)
    run 210 python3 -m pytest -q -rs -m gpu tests/test_gpu.py tests/test_ssd_scan.py
    # 2. the benchmark, one section per process, shortest first
    run 60 python3 benchmarks/bench_gpu.py --sections scan --repeats 3 --json "$OUT/bench_scan.json"
    run 120 python3 benchmarks/bench_gpu.py --sections layer --repeats 3 --json "$OUT/bench_layer.json"
    run 90 python3 benchmarks/bench_gpu.py --sections step --repeats 3 --json "$OUT/bench_step.json"
else
    echo "usage: bash benchmarks/gpu_suite.sh [--prepare | --cpu-smoke]" >&2
    exit 2
fi
say "gpu_suite done $(date -u +%H:%M:%S)"
