#!/usr/bin/env bash
# One GPU session, one command: install the wheels the GPU machine lacks, run the gpu-marked tests,
# then benchmarks/bench_throughput.py's plan, inside ~8 minutes, writing every number under $OUT.
#
# Build the wheels on the development machine first (from the repository root):
#   bash ../shared/device/wheelhouse.sh .device-wheels      # deepspeed, megatron-core, liger-kernel, pydantic, ...
# then, on the GPU machine, from the repository root (the device tool: carry [".device-wheels"]):
#   bash benchmarks/gpu_session.sh .device-wheels
#
# Writes (at most 6 files, as the device tool brings back 8): $OUT/env.txt, $OUT/gpu_tests.log,
# $OUT/gpu_tests.xml, $OUT/bench.log, $OUT/bench/results.json, $OUT/bench/summary.txt. Without
# $OUT they go to ./gpu_session_out. Time limits: TOTAL_S (default 510) for everything, of which
# the tests get at most TESTS_S (default 180; interrupted, pytest still writes its report); the
# benchmark starts no new configuration in its last minute and is stopped at the end of TOTAL_S
# (its results.json is written after every configuration, so what it measured stays).
# A second call for the plan entries the first marked "skipped (time budget)", with the HF
# baseline again (ratios only hold within one run):
#   SKIP_TESTS=1 BENCH_ARGS="--plan hf-compile@8,<skipped entries>" bash benchmarks/gpu_session.sh .device-wheels
set -uo pipefail
WHEELS=${1:?usage: gpu_session.sh WHEEL_DIR}
TOTAL_S=${TOTAL_S:-510}
TESTS_S=${TESTS_S:-180}
OUT=${OUT:-$PWD/gpu_session_out}
mkdir -p "$OUT/bench"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
export PYTHONUNBUFFERED=1

# 1. Wheels into a private folder first on the path (the machine's torch, transformers, triton stay).
#    SKIP_INSTALL=1 skips this (a dry run where the packages are installed already).
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  python3 - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
for name in ("deepspeed", "megatron.core", "transformers", "triton", "liger_kernel", "flash_attn",
             "transformer_engine", "apex"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "installed"))
    except Exception as err:  # noqa: BLE001
        print(name, "missing:", type(err).__name__)
EOF
  echo "install done at $(elapsed) s"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 2. The gpu-marked tests (kernels against the plain path on CUDA).
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout -s INT -k 20 "$TESTS_S" python3 -m pytest tests/gpu -m gpu -q -p no:cacheprovider -rs \
    --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
  TESTS_RC=$?
else
  echo "skipped (SKIP_TESTS=1)" > "$OUT/gpu_tests.log"
  TESTS_RC=0
fi
tail -n 25 "$OUT/gpu_tests.log"
echo "gpu tests: exit $TESTS_RC at $(elapsed) s"

# 3. The benchmark with what is left.
LEFT=$(( TOTAL_S - $(elapsed) ))
if [ "$LEFT" -gt 90 ]; then
  timeout "$LEFT" python3 benchmarks/bench_throughput.py --out "$OUT/bench" --time-budget-s $(( LEFT - 60 )) \
    ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  BENCH_RC=$?
else
  echo "no time left for the benchmark" > "$OUT/bench.log"
  BENCH_RC=124
fi
# A benchmark stopped by the time limit has no summary yet: make it from results.json.
[ -s "$OUT/bench/summary.txt" ] || python3 benchmarks/bench_throughput.py --summarise "$OUT/bench/results.json" \
  >> "$OUT/bench.log" 2>&1
cat "$OUT/bench/summary.txt" 2>/dev/null || tail -n 30 "$OUT/bench.log"
echo "bench: exit $BENCH_RC at $(elapsed) s; gpu tests exit $TESTS_RC"
[ "$TESTS_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
