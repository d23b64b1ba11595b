#!/usr/bin/env bash
# One prepared check for a GPU machine with no network (issues 4 and 5).
#
#   bash perf/device_check.sh [OUT_DIR]      # default: $OUT, else perf/results/device_check
#
# Steps, each under `timeout` (worst case about 8 minutes in all: the sweep gets
# what is left of BUDGET=470 s; limits can be overridden with T_INFO,
# T_INSTALL, T_WHEELS, T_TESTS, T_CHECKS, T_PERF and BUDGET, and
# steps skipped by name with SKIP_STEPS="install tests"; DEVICE=auto lets the
# last two steps fall back to CPU for a dry run of this script):
#   1. device, driver, clocks, python / torch / triton / cuDNN versions;
#   2. the project installed offline (pip --no-deps --no-build-isolation -e .);
#   3. wheels carried in .whl/ (e.g. liger-kernel), if that folder exists,
#      installed into /tmp/site and put on PYTHONPATH;
#   4. the test suite on CUDA (python -m pytest -q, over 8 xdist workers if present);
#   5. the GPU-only checks (python -m perf.gpu_checks: CUDA graphs, no syncs);
#   6. the quick sweep (python -m perf --quick --out OUT_DIR);
# then a short table. Everything is logged to OUT_DIR/device_check.log; the
# sweep writes its CSV, summary and plots beside it (the plots go into one
# tarball when the folder would otherwise hold more than 8 files).
#
# It only reads the GPU's state: it never changes clocks, power, modes or MIG,
# and never resets the device.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT_DIR="${1:-${OUT:-perf/results/device_check}}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/device_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1
export PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"  # the checks fail loudly without a GPU; DEVICE=auto for a CPU dry run

T_INFO=${T_INFO:-20}
T_INSTALL=${T_INSTALL:-60}
T_WHEELS=${T_WHEELS:-30}
T_TESTS=${T_TESTS:-200}
T_CHECKS=${T_CHECKS:-60}
T_PERF=${T_PERF:-240}   # the most the sweep gets; it also never runs past BUDGET
BUDGET=${BUDGET:-470}   # seconds for the whole script (under 8 minutes with the kill grace)

START=$(date +%s)
FAILED=0
STEPS=()

# run_step NAME LIMIT CMD... : run CMD under timeout, log it, record the outcome.
# SKIP_STEPS="install tests" skips steps by name (for a dry run of this script).
run_step() {
  local name=$1 limit=$2
  shift 2
  local t0 rc dt word
  if [[ " ${SKIP_STEPS:-} " == *" $name "* ]]; then
    echo "===== $name: skipped (SKIP_STEPS)" | tee -a "$LOG"
    STEPS+=("| $name | skipped | 0s |")
    return 0
  fi
  t0=$(date +%s)
  echo "===== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  dt=$(( $(date +%s) - t0 ))
  if [ "$rc" -eq 0 ]; then word=ok
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then word="TIMEOUT (rc $rc)"
  else word="FAILED (rc $rc)"
  fi
  [ "$rc" -eq 0 ] || FAILED=1
  echo "===== $name: $word in ${dt}s" | tee -a "$LOG"
  STEPS+=("| $name | $word | ${dt}s |")
  return "$rc"
}

device_info() {
  nvidia-smi || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu,persistence_mode \
    --format=csv || true
  "$PY" - <<'EOF'
import platform, sys
print("python", sys.version.split()[0], sys.executable, platform.platform())
import torch, triton
print("torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
print("triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name} | cc {p.major}.{p.minor} | {p.multi_processor_count} SMs | "
          f"{p.total_memory / 2**30:.1f} GiB | L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
else:
    print("NO CUDA DEVICE VISIBLE TO TORCH")
for mod in ("liger_kernel", "quack", "matplotlib", "tqdm", "pytest", "hypothesis"):
    try:
        m = __import__(mod)
        print(f"{mod} {getattr(m, '__version__', 'present')}")
    except Exception as exc:
        print(f"{mod} absent ({type(exc).__name__})")
EOF
}
export -f device_info

install_wheels() {
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
}
export -f install_wheels

run_step info "$T_INFO" bash -c device_info
run_step install "$T_INSTALL" "$PY" -m pip install --no-deps --no-build-isolation -e .
if compgen -G ".whl/*.whl" > /dev/null; then
  if run_step wheels "$T_WHEELS" bash -c install_wheels; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  echo "no .whl/ folder: liger / quack run only if the image has them" | tee -a "$LOG"
fi
# On a GPU each distinct kernel specialisation is JIT-compiled on first use, so
# the suite is compile-bound: spread the test files over CPU workers with
# pytest-xdist when the image has it (it does: KINDS.md's package list).
XDIST=""
if "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n 8 --dist loadfile"; fi
# shellcheck disable=SC2086
run_step tests "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider $XDIST
run_step gpu_checks "$T_CHECKS" "$PY" -m perf.gpu_checks --device "$DEVICE"
# The sweep takes what is left of the budget (at least 60 s, at most T_PERF); when
# `timeout` stops it, it still writes the CSV and summary of what it measured.
left=$(( BUDGET - ($(date +%s) - START) - 15 ))
[ "$left" -gt "$T_PERF" ] && left=$T_PERF
[ "$left" -lt 60 ] && left=60
run_step perf_quick "$left" "$PY" -m perf --quick --device "$DEVICE" --out "$OUT_DIR"

# The return folder of a lent machine brings back at most 8 files: pack the plots if needed.
n_files=$(find "$OUT_DIR" -maxdepth 1 -type f | wc -l)
if [ "$n_files" -gt 8 ] && compgen -G "$OUT_DIR/*.png" > /dev/null; then
  (cd "$OUT_DIR" && tar -czf plots.tar.gz ./*.png && rm -f ./*.png) \
    && echo "packed the plots into $OUT_DIR/plots.tar.gz" | tee -a "$LOG"
fi

{
  echo
  echo "##### GPU checks"
  sed -n '/^===== gpu_checks (/,/^===== gpu_checks:/p' "$LOG" | grep '^|' || echo "(no table)"
  echo
  echo "##### quick sweep summary"
  summary=$(ls -t "$OUT_DIR"/*_summary.md 2>/dev/null | head -1)
  if [ -n "$summary" ]; then cat "$summary"; else echo "(no summary written)"; fi
  echo
  echo "##### device check: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1), $(( $(date +%s) - START ))s in all, files in $OUT_DIR"
  echo "| step | result | time |"
  echo "|---|---|---|"
  printf '%s\n' "${STEPS[@]}"
} | tee -a "$LOG"
exit "$FAILED"
