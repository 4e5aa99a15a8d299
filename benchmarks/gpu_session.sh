#!/usr/bin/env bash
# One GPU session, one command, at most 8 minutes (TOTAL_S=470 s, the wheel install included), most
# important first:
#   1. install the wheels the GPU machine lacks                              (timeout INSTALL_S=90)
#   2. stack-auto vs hf-compile: TinyLlama 1.1B, bf16, micro-batch 8         (timeout HEAD_S=240)
#   3. the gpu-marked tests (kernels against the plain path on CUDA)        (timeout TESTS_S=100)
#   3b. the demo (tinyllama-demo) on one GPU                              (timeout DEMO_S=150)
#   4. the other levers (benchmarks/bench_throughput.py's REST_PLAN), appended to the same
#      results.json, with what is left; no configuration starts in the last minute
#   5. the summary (also from a results.json cut short by a time limit)
# Every phase has its own time limit and is recorded in $OUT/session.json as it ends (name, exit
# status, seconds, the device name), so a session stopped anywhere keeps what it measured;
# bench_throughput.py rewrites $OUT/bench/results.json (the device name in it) after every
# configuration. Whoever runs it commits bench/results.json under benchmarks/results/ and quotes
# it in docs/performance.md.
#
# Build the wheels on the development machine first (from the repository root):
#   bash ../shared/device/wheelhouse.sh .device-wheels      # deepspeed, megatron-core, liger-kernel, pydantic, ...
# then, on the GPU machine, from the repository root (the device tool: carry [".device-wheels"]):
#   bash benchmarks/gpu_session.sh .device-wheels
# On a machine without a GPU, the plumbing at a tiny shape in well under a minute (no install, no
# compile; tests/unit/test_bench_throughput.py runs it):
#   bash benchmarks/gpu_session.sh --dry-run
#
# Writes (8 files, what the device tool brings back): $OUT/session.json, $OUT/env.txt,
# $OUT/gpu_tests.log, $OUT/gpu_tests.xml, $OUT/demo.log, $OUT/bench.log, $OUT/bench/results.json,
# $OUT/bench/summary.txt. Without $OUT they go to ./gpu_session_out.
# Options (environment): TOTAL_S, INSTALL_S, HEAD_S, TESTS_S, DEMO_S; SKIP_INSTALL=1 (packages
# already there), SKIP_TESTS=1, SKIP_DEMO=1, SKIP_BENCH=1 (phases 2 and 4); HEAD_PLAN / REST_PLAN
# (bench_throughput.py --plan values); BENCH_ARGS
# (more bench_throughput.py arguments for both parts).
set -uo pipefail
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1; WHEELS=""
else
  DRY_RUN=0; WHEELS=${1:?usage: gpu_session.sh WHEEL_DIR | gpu_session.sh --dry-run}
fi
TOTAL_S=${TOTAL_S:-470}
INSTALL_S=${INSTALL_S:-90}
HEAD_S=${HEAD_S:-240}
TESTS_S=${TESTS_S:-100}
DEMO_S=${DEMO_S:-150}
OUT=${OUT:-$PWD/gpu_session_out}
if [ "$DRY_RUN" = 1 ]; then
  SKIP_INSTALL=1
  # A tiny shape, nothing compiled (on CPU 'auto' is the plain path): the plumbing only.
  SHAPE_ARGS="--preset tinyllama-debug --seq-length 32 --accumulation 1 --warmup-steps 1 --steps 1 --peak-tflops 1"
  HEAD_PLAN=${HEAD_PLAN:-hf-eager@2,stack-auto@2}
  REST_PLAN=${REST_PLAN:-stack-plain@2}
else
  SHAPE_ARGS=""
  HEAD_PLAN=${HEAD_PLAN:-head}
  REST_PLAN=${REST_PLAN:-rest}
fi
mkdir -p "$OUT/bench"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( TOTAL_S - $(elapsed) )); }
limit() { local want=$1 have; have=$(left); [ "$want" -lt "$have" ] && echo "$want" || echo "$have"; }
export PYTHONUNBUFFERED=1 OUT

# session.json: one record per phase, rewritten as each phase ends.
record() {  # record NAME EXIT_STATUS SECONDS [NOTE]
  python3 - "$OUT/session.json" "$1" "$2" "$3" "${4:-}" "$(elapsed)" "$TOTAL_S" "$DRY_RUN" <<'EOF'
import json, os, sys
path, name, rc, seconds, note, total, budget, dry = sys.argv[1:9]
try:
    session = json.load(open(path))
except (OSError, ValueError):
    session = {"phases": []}
session["device"] = os.environ.get("DEVICE_NAME") or "unknown"
session.update(dry_run=dry == "1", budget_s=int(budget), elapsed_s=int(total))
status = {"0": "ok", "124": "timed out", "137": "killed at its time limit"}.get(rc, f"exit {rc}")
session["phases"].append({"phase": name, "status": status, "exit": int(rc), "seconds": int(seconds),
                          **({"note": note} if note else {})})
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump(session, f, indent=1)
os.replace(tmp, path)
EOF
}
rm -f "$OUT/session.json" "$OUT/bench/results.json" "$OUT/bench/summary.txt"

# 1. Wheels into a private folder first on the path (the machine's torch, transformers, triton stay).
t0=$(date +%s)
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  timeout "$(limit "$INSTALL_S")" python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site "$WHEELS"/*.whl
  INSTALL_RC=$?
  INSTALL_NOTE=""
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  INSTALL_RC=0
  INSTALL_NOTE="skipped"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
INSTALL_SECONDS=$(( $(date +%s) - t0 ))

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  python3 - <<'EOF'
import importlib, torch
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", device)
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
DEVICE_NAME=$(sed -n 's/^torch .* device //p' "$OUT/env.txt" | head -n 1)
export DEVICE_NAME
record install "$INSTALL_RC" "$INSTALL_SECONDS" "$INSTALL_NOTE"
[ "$INSTALL_RC" -eq 0 ] || { echo "wheel install failed (exit $INSTALL_RC)"; exit 1; }

bench() {  # bench PLAN TIME_LIMIT_S EXTRA_ARGS...
  local plan=$1 seconds=$2; shift 2
  # shellcheck disable=SC2086  # SHAPE_ARGS and BENCH_ARGS are word lists
  timeout -k 10 "$seconds" python3 benchmarks/bench_throughput.py --out "$OUT/bench" --plan "$plan" \
    $SHAPE_ARGS ${BENCH_ARGS:-} "$@" >> "$OUT/bench.log" 2>&1
}

# 2. The head-to-head that matters most.
: > "$OUT/bench.log"
t0=$(date +%s)
if [ "${SKIP_BENCH:-0}" = 1 ]; then
  HEAD_RC=0
  record "bench: $HEAD_PLAN" 0 0 "skipped"
else
  bench "$HEAD_PLAN" "$(limit "$HEAD_S")"
  HEAD_RC=$?
  record "bench: $HEAD_PLAN" "$HEAD_RC" $(( $(date +%s) - t0 ))
fi
echo "head-to-head: exit $HEAD_RC at $(elapsed) s"

# 3. The gpu-marked tests (interrupted by their time limit, pytest still writes its report).
t0=$(date +%s)
if [ "${SKIP_TESTS:-0}" != 1 ] && [ "$(left)" -gt 30 ]; then
  timeout -s INT -k 20 "$(limit "$TESTS_S")" python3 -m pytest tests/gpu -m gpu -q -p no:cacheprovider -rs \
    --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
  TESTS_RC=$?
  record "gpu tests" "$TESTS_RC" $(( $(date +%s) - t0 ))
else
  echo "skipped (SKIP_TESTS=1 or no time left)" > "$OUT/gpu_tests.log"
  TESTS_RC=0
  record "gpu tests" 0 0 "skipped"
fi
tail -n 25 "$OUT/gpu_tests.log"
echo "gpu tests: exit $TESTS_RC at $(elapsed) s"

# 3b. The demo on one GPU, as a user first meets the stack (its own data, tokenizer, launcher,
# conversion and generation); skipped in a dry run (tests/integration runs it on CPU).
t0=$(date +%s)
if [ "$DRY_RUN" != 1 ] && [ "${SKIP_DEMO:-0}" != 1 ] && [ "$(left)" -gt 60 ]; then
  DEMO_DIR=$(mktemp -d)
  PATH=/tmp/site/bin:$PATH timeout -k 10 "$(limit "$DEMO_S")" python3 -m megatron_tinyllama.demo \
    --work-dir "$DEMO_DIR/demo" > "$OUT/demo.log" 2>&1
  DEMO_RC=$?
  record demo "$DEMO_RC" $(( $(date +%s) - t0 ))
  tail -n 15 "$OUT/demo.log"
else
  DEMO_RC=0
  record demo 0 0 "skipped"
fi
echo "demo: exit $DEMO_RC at $(elapsed) s"

# 4. The other levers with what is left, appended to the same results.json.
t0=$(date +%s)
LEFT=$(left)
if [ "${SKIP_BENCH:-0}" = 1 ]; then
  REST_RC=0
  record "bench: $REST_PLAN" 0 0 "skipped"
elif [ "$LEFT" -gt 90 ]; then
  bench "$REST_PLAN" "$LEFT" --append --time-budget-s $(( LEFT - 60 ))
  REST_RC=$?
  record "bench: $REST_PLAN" "$REST_RC" $(( $(date +%s) - t0 ))
else
  REST_RC=124
  record "bench: $REST_PLAN" 124 0 "no time left"
fi

# 5. The summary of everything measured (made from results.json: a part may have been cut short).
t0=$(date +%s)
if [ -f "$OUT/bench/results.json" ]; then
  python3 benchmarks/bench_throughput.py --summarise "$OUT/bench/results.json" >> "$OUT/bench.log" 2>&1
  record summary $? $(( $(date +%s) - t0 ))
else
  record summary 0 0 "nothing measured"
fi
cat "$OUT/bench/summary.txt" 2>/dev/null || tail -n 30 "$OUT/bench.log"
echo "session: $(elapsed) s of $TOTAL_S; head-to-head exit $HEAD_RC, gpu tests exit $TESTS_RC, demo exit $DEMO_RC, other levers exit $REST_RC"
[ "$HEAD_RC" -eq 0 ] && [ "$TESTS_RC" -eq 0 ] && [ "$DEMO_RC" -eq 0 ]
