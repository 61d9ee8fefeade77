#!/usr/bin/env bash
# The GPU check, one command on a fresh H200 (the device tool; its own stack: torch 2.11, triton 3.6,
# transformers 5.17, Python 3.12, no network): kernel and op tests on CUDA (real kernels), the attention
# benchmark grid, an end-to-end run with the Triton path forced and its counters checked. Every log,
# table and JSON goes to $OUT (at most 8 files come back). At most 8 minutes: each step has its own
# limit (tests 3, e2e 1.5, attention 3.3 minutes), and the attention JSON is rewritten after every shape,
# so a cut run keeps what it measured. SmolLM2's weights (94 MB) exceed what a device call carries (64 MiB),
# so the end-to-end run uses a random Llama; benchmarks/bench_generate.py is the real-weights run.
#
#   device run:  bash scripts/gpu_check.sh                     (timeout_s 540)
#   then, if device time is left: GPU_CHECK_STEPS=decode bash scripts/gpu_check.sh   (timeout_s 300: the
#                end-to-end decode throughput and the fixed-memory-budget rows, benchmarks/bench_decode_gpu.py)
#   CPU dry run: GPU_CHECK_SMOKE=1 OUT=/tmp/x bash scripts/gpu_check.sh   (tests/test_gpu_check.py: every step)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SMOKE=${GPU_CHECK_SMOKE:-0}
STEPS=${GPU_CHECK_STEPS:-tests,e2e,attention}
want() { [ "$SMOKE" = 1 ] || [[ ",$STEPS," == *",$1,"* ]]; }
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # wheels the image lacks, carried (device README)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
status=0
step() {  # name, limit in seconds, command...: runs it, logs to $OUT/<name>.txt, records a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T))"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.txt"
    echo "== $name: rc=$rc"
    [ $rc -eq 0 ] || status=1
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  $PY -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1
    step tests 300 env HYPOTHESIS_PROFILE=ci $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k skips
    step attention 120 $PY benchmarks/bench_attention.py --smoke --out "$OUT/attention.json"
    step e2e 300 $PY scripts/gpu_e2e.py --smoke --out "$OUT/e2e.json"
    step decode 300 $PY benchmarks/bench_decode_gpu.py --smoke --out "$OUT/decode.json"
else
    # pytest-xdist is in the image: Triton compiles each kernel variant once per process, in parallel
    want tests && step tests 180 env HYPOTHESIS_PROFILE=ci $PY -m pytest -q -p no:cacheprovider -n 8 tests/test_kernels.py tests/test_ops.py
    want e2e && step e2e 90 $PY scripts/gpu_e2e.py --out "$OUT/e2e.json"
    want attention && step attention 200 $PY benchmarks/bench_attention.py --out "$OUT/attention.json"
    want decode && step decode 270 $PY benchmarks/bench_decode_gpu.py --models llama3-8b --batches 1,8,32 --out "$OUT/decode.json"
fi
echo "gpu_check: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status
