#!/usr/bin/env bash
# One prepared check for a GPU machine with no network.
#
#   bash perf/device_check.sh [OUT_DIR]      # default: $OUT, else perf/results/device_check
#
# The whole script stays under BUDGET=395 s (6.6 minutes, 6.75 with the kill
# grace) on an H100/H200, so that a start, this call and a second one on the
# warm machine (the quick sweep alone, ~4.2 minutes, or the failed steps
# again with SKIP_STEPS) fit in the 15 minutes of device time a lent machine
# gives (~1.5 + 6.75 + 4.2 = 12.5; a whole second run would not fit). Every step runs under
# `timeout`, and no step runs past the deadline minus the minimum kept for the
# steps after it: even when every step runs to its limit the script ends by
# BUDGET (plus at most 10 s of kill grace). The limits of the steps up to
# llama sum to 392 s: the quick sweep runs only on what is left, so on a GPU
# it is a second call (below).
#
# Time per step: MEASURED on an H200 on 2026-12-04 (two whole runs of this
# script, perf/results/nvidia-h200/2026-12-04/device_check*.log), then the
# limit given for this version of the step. Every step writes what it
# measured as it goes, or when `timeout` stops it:
#
# | step       | measured       | limit | what it does |
# |------------|----------------|-------|--------------|
# | install    | 4 s, 4 s       |  12 s | pip install -e . offline (--no-deps --no-build-isolation) |
# | wheels     | 1 s, 0 s       |  10 s | only when .whl/ exists (liger-kernel, cut-cross-entropy: bash perf/fetch_wheels.sh) |
# | info       | 9 s, 15 s (cut)|  15 s | nvidia-smi; the first import of torch and triton; the peers the wheels brought |
# | gpu_checks | 23 s, 26 s     |  60 s | no-sync steps, CUDA graphs, the lean linear CE over an fp32 head under autocast (its peak), then every long-row path at grad_output != 1 against float64 at LLM sizes, twice each (those last: ~20 first compiles, ~25 s more, estimated); a table row per check as it ends |
# | tune       | 67 s, 54 s     |  60 s | the tuning run; stops starting candidates 15 s before its limit and writes what it measured; stops at a fault that leaves the CUDA context unusable |
# | tests      | 93 s, 80 s     | 130 s | the suite on CUDA over 12 xdist workers (compile-bound), 715 tests where those runs had 474; SIGINT at the limit, so pytest still prints the failures and writes tests_junit.xml |
# | profile    | new            |  30 s | python -m perf.profile: ncu counters (base units) of the hot shapes, most important first, one ncu process each (the cross-entropy at 4096 and 128256 at least, estimated), installed, default and tuned plans; starts no shape past 5 s before its limit |
# | linear_ce  | 46 s, 40 s     |  35 s | the Llama-3-8B head at 4096 and 16384 tokens against the GEMM floor and the peers (its --quick set, stopped by --time-budget-s 23; torch.compile left out: its compile alone took ~30 s) |
# | host       | 12 s (crashed) |  15 s | python -m perf.host --brief: host cost per call, stubbed and launched (~0.05 s a row, 63 rows; the CSV grows row by row) |
# | llama      | new            |  25 s | examples/train_tiny_llama.py, 10 steps per mode, 2 layers: a trainer's step time and peak memory (estimated; the JSON is written after each mode) |
# | perf_quick | 114 s (cut), 158 s alone | rest, <= 240 s | the quick sweep at 40 ms of repeats, the cross-entropy first; cut short, it still writes what it measured |
#
# The quick sweep, on a GPU: right after the first call, on the warm machine,
#   SKIP_STEPS="gpu_checks tune tests profile linear_ce host llama" bash perf/device_check.sh "$OUT"
# (~250 s: install, wheels and info again, then the sweep alone).
#
# Left to CI (CPU, no GPU needed; they would cost minutes here):
# tests/test_static_compile.py (compiles ~2700 sm_90 variants),
# test_packaging.py (builds a wheel), test_perf_harness.py, test_tune.py and
# test_examples.py (CPU subprocess runs).
#
# Outputs, in OUT_DIR, at most 8 files and no folder (the lent machine brings
# back 8 files, 2 folder levels): device_check.log (every step's output),
# device_check_summary.md (the tables), tuned_<gpu>.json (the tuning run's
# table: `python -m perf.tune --install` it and commit it), the CSVs of the
# tuning run, the quick sweep, the linear cross-entropy run and the host cost
# (perf/results conventions: commit them under perf/results/<gpu>/<date>/),
# and extras.tar.gz with the plots, the per-run summaries, the profile CSV
# and the trainer's JSON and plot.
#
# Knobs: T_<STEP> limits (T_INFO, T_INSTALL, T_WHEELS, T_CHECKS, T_TUNE,
# T_TESTS, T_PROFILE, T_LINEAR, T_HOST, T_LLAMA, T_PERF) and BUDGET;
# SKIP_STEPS="install tests" skips steps by name (a rerun of the failed ones);
# WHEEL_DIR (default .whl) the carried wheels; DEVICE=auto lets the steps
# fall back to CPU for a dry run of this script; DRY_RUN=1 runs no step at
# all, writes stand-in files and advances a simulated clock by each step's
# full limit (the worst case of the budget and of the output limits, checked
# by tests/test_tune.py).
#
# It only reads the GPU's state: it never changes clocks, power, modes or MIG,
# and never resets the device.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT_DIR="${1:-${OUT:-perf/results/device_check}}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/device_check.log"
SUMMARY="$OUT_DIR/device_check_summary.md"
: > "$LOG"
export PYTHONUNBUFFERED=1
export PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"  # the checks fail loudly without a GPU; DEVICE=auto for a CPU dry run
DRY_RUN="${DRY_RUN:-0}"

T_INFO=${T_INFO:-15}
T_INSTALL=${T_INSTALL:-12}
T_WHEELS=${T_WHEELS:-10}
T_CHECKS=${T_CHECKS:-60}
T_TUNE=${T_TUNE:-60}
T_TESTS=${T_TESTS:-130}
T_PROFILE=${T_PROFILE:-30}
T_LINEAR=${T_LINEAR:-35}
T_HOST=${T_HOST:-15}
T_LLAMA=${T_LLAMA:-25}
T_PERF=${T_PERF:-240}
BUDGET=${BUDGET:-395}
WHEEL_DIR=${WHEEL_DIR:-.whl}
# The least time worth giving a step: kept free for it by the steps before it
# (none for the quick sweep: it takes what is left).
MIN_TUNE=40 MIN_TESTS=90 MIN_PROFILE=20 MIN_LINEAR=25 MIN_HOST=10 MIN_LLAMA=15
MIN_PERF=0
MIN_STEP=10  # a step that would get less is skipped ("no time left")
MIN_PERF_RUN=60  # ... and the quick sweep below this (it would measure a few runs)

SIM_ELAPSED=0  # DRY_RUN: seconds the skipped steps would have taken at most
# DRY_RUN keeps time on the simulated clock alone (the script's own seconds on
# a loaded machine would make its budget arithmetic depend on that machine).
if [ "$DRY_RUN" = 1 ]; then
  SIM_T0=$(date +%s)
  now() { echo $(( SIM_T0 + SIM_ELAPSED )); }
else
  now() { echo $(( $(date +%s) + SIM_ELAPSED )); }
fi
START=$(now)
DEADLINE=$(( START + BUDGET ))
FAILED=0
STEPS=()

# limit WANT RESERVE: WANT seconds, or less so that RESERVE seconds are left
# before the deadline for the steps after this one.
limit() {
  local left=$(( DEADLINE - $(now) - $2 ))
  if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}

# Stand-in outputs of a step for DRY_RUN (the real steps' file names; more
# than they write, and a folder, so that the packing below is exercised).
dry_outputs() {
  local s="dry-gpu_$(date -u +%F)"
  case $1 in
    tune) touch "$OUT_DIR/${s}_tune.csv" "$OUT_DIR/tuned_dry-gpu.json" "$OUT_DIR/${s}_tune_summary.md" \
                "$OUT_DIR/${s}_tune_softmax.png" "$OUT_DIR/${s}_tune_cross_entropy.png" \
                "$OUT_DIR/${s}_tune_softmax_backward.png" "$OUT_DIR/${s}_tune_log_softmax.png" ;;
    linear_ce) touch "$OUT_DIR/${s}_linear.csv" "$OUT_DIR/${s}_linear_summary.md" \
                     "$OUT_DIR/${s}_linear_linear_ce_fwd_bwd_bf16.png" ;;
    host) touch "$OUT_DIR/${s}_host.csv" ;;
    profile) touch "$OUT_DIR/${s}_profile.csv" ;;
    llama) touch "$OUT_DIR/train_tiny_llama.json" "$OUT_DIR/train_tiny_llama.png" ;;
    tests) mkdir -p "$OUT_DIR/stray/a/b" && touch "$OUT_DIR/stray/a/b/deep.txt" \
                                                  "$OUT_DIR/tests_junit.xml" ;;
    perf_quick)
      touch "$OUT_DIR/${s}.csv" "$OUT_DIR/${s}_summary.md"
      for op in softmax_fwd ce_fwd_bwd softmax_fwd_bwd ce_fwd log_softmax_fwd vocab_parallel; do
        touch "$OUT_DIR/${s}_${op}_bf16.png"
      done ;;
  esac
}

# run_step NAME LIMIT CMD... : run CMD under timeout, log it, record the outcome.
run_step() {
  local name=$1 lim=$2
  shift 2
  local t0 rc dt word
  if [[ " ${SKIP_STEPS:-} " == *" $name "* ]]; then
    echo "===== $name: skipped (SKIP_STEPS)" | tee -a "$LOG"
    STEPS+=("| $name | skipped | 0s | - |")
    return 0
  fi
  local floor=$MIN_STEP
  [ "$name" = perf_quick ] && floor=$MIN_PERF_RUN
  if [ "$lim" -lt "$floor" ]; then
    if [ "$name" = perf_quick ]; then  # planned: on a GPU the quick sweep is a second call
      echo "===== $name: not run: no time left; run it in a second call (see the header)" | tee -a "$LOG"
      STEPS+=("| $name | not run (a second call: see the header) | 0s | ${lim}s |")
      return 0
    fi
    echo "===== $name: NOT RUN: no time left (${lim}s before the budget's deadline)" | tee -a "$LOG"
    STEPS+=("| $name | NOT RUN (no time left) | 0s | ${lim}s |")
    FAILED=1
    return 1
  fi
  t0=$(now)
  # the signal at the limit: TERM, or the step's SIGNAL_<name> (INT for pytest,
  # which then still prints its failures)
  local sig_var="SIGNAL_$name"
  local sig=${!sig_var:-TERM}
  echo "===== $name (limit ${lim}s): $*" | tee -a "$LOG"
  if [ "$DRY_RUN" = 1 ]; then
    dry_outputs "$name"
    SIM_ELAPSED=$(( SIM_ELAPSED + lim ))
    rc=0
  else
    timeout -s "$sig" --kill-after=10 "$lim" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
  fi
  dt=$(( $(now) - t0 ))
  if [ "$rc" -eq 0 ]; then word=ok
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then word="TIMEOUT (rc $rc; what it wrote is kept)"
  else word="FAILED (rc $rc)"
  fi
  [ "$rc" -eq 0 ] || FAILED=1
  echo "===== $name: $word in ${dt}s" | tee -a "$LOG"
  STEPS+=("| $name | $word | ${dt}s | ${lim}s |")
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
from importlib import metadata
# module -> its distribution (the version a report names: liger_kernel has no __version__)
for mod, dist in (("liger_kernel", "liger-kernel"), ("quack", "quack-kernels"),
                  ("cut_cross_entropy", "cut-cross-entropy"), ("matplotlib", "matplotlib"),
                  ("tqdm", "tqdm"), ("pytest", "pytest"), ("xdist", "pytest-xdist"),
                  ("hypothesis", "hypothesis"), ("transformers", "transformers")):
    try:
        m = __import__(mod)
    except Exception as exc:
        print(f"{mod} absent ({type(exc).__name__})")
        continue
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:
        version = getattr(m, "__version__", "present (version unknown)")
    print(f"{mod} {version}")
EOF
}
export -f device_info

install_wheels() {
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEEL_DIR"/*.whl
}
export -f install_wheels
export WHEEL_DIR

run_step install "$(limit "$T_INSTALL" 0)" "$PY" -m pip install --no-deps --no-build-isolation -e .
if compgen -G "$WHEEL_DIR/*.whl" > /dev/null; then
  if run_step wheels "$(limit "$T_WHEELS" 0)" bash -c install_wheels; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  echo "no $WHEEL_DIR/ folder: liger / quack / cut-cross-entropy run only if the image has them" | tee -a "$LOG"
fi
run_step info "$(limit "$T_INFO" 0)" bash -c device_info  # after the wheels: it lists the peers
AFTER_CHECKS=$((MIN_TUNE + MIN_TESTS + MIN_PROFILE + MIN_LINEAR + MIN_HOST + MIN_LLAMA + MIN_PERF))

run_step gpu_checks "$(limit "$T_CHECKS" "$AFTER_CHECKS")" "$PY" -m perf.gpu_checks --device "$DEVICE"

# The tuning run: stops starting candidates 15 s before its limit, then writes
# its CSV, plots and the table (tuned_<gpu>.json) of what it measured.
lim=$(limit "$T_TUNE" $((AFTER_CHECKS - MIN_TUNE)))
run_step tune "$lim" "$PY" -m perf.tune --device "$DEVICE" --out "$OUT_DIR" \
  --time-limit $(( lim > 30 ? lim - 15 : lim / 2 ))

# The suite on CUDA is compile-bound (every distinct kernel specialisation is
# JIT-compiled on first use): spread single tests over 12 of the 16 CPUs with
# pytest-xdist when the image has it (it does: KINDS.md's package list).
XDIST=""
if "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n 12 --dist load"; fi
# shellcheck disable=SC2086
SIGNAL_tests=INT run_step tests \
  "$(limit "$T_TESTS" $((MIN_PROFILE + MIN_LINEAR + MIN_HOST + MIN_LLAMA + MIN_PERF)))" \
  "$PY" -m pytest -q -p no:cacheprovider $XDIST --durations=15 -rfE \
  --junitxml="$OUT_DIR/tests_junit.xml" \
  --ignore=tests/test_static_compile.py --ignore=tests/test_packaging.py \
  --ignore=tests/test_perf_harness.py --ignore=tests/test_tune.py --ignore=tests/test_examples.py

# The hardware counters of the hot kernels, default and tuned plans (the
# table the tuning step just wrote, when it wrote one).
TABLE=$(ls -t "$OUT_DIR"/tuned_*.json 2>/dev/null | head -1)
lim=$(limit "$T_PROFILE" $((MIN_LINEAR + MIN_HOST + MIN_LLAMA + MIN_PERF)))
run_step profile "$lim" "$PY" -m perf.profile --out "$OUT_DIR" ${TABLE:+--table "$TABLE"} \
  --time-budget-s $(( lim > 10 ? lim - 5 : lim / 2 ))

# The fused linear + cross-entropy anchor shapes against the three-GEMM
# floor, timed first; torch.compile last (its compile is the slowest part,
# and `timeout` cutting it still leaves the rest).
lim=$(limit "$T_LINEAR" $((MIN_HOST + MIN_LLAMA + MIN_PERF)))
run_step linear_ce "$lim" "$PY" -m perf --quick --device "$DEVICE" --out "$OUT_DIR" --tag linear \
  --no-progress --ops linear_ce_fwd_bwd --rep-ms 150 --time-budget-s $(( lim > 25 ? lim - 12 : lim / 2 )) \
  --providers gemm_floor,softmax_gpu,torch,cce,liger,softmax_gpu_overlap,softmax_gpu_lean

run_step host "$(limit "$T_HOST" $((MIN_LLAMA + MIN_PERF)))" "$PY" -m perf.host --device "$DEVICE" \
  --brief --out "$OUT_DIR"

# A trainer's step: transformers' Llama plain, hooked and fused (step time,
# peak memory, loss curves).
run_step llama "$(limit "$T_LLAMA" "$MIN_PERF")" "$PY" examples/train_tiny_llama.py --steps 10 --layers 2 \
  --device "$DEVICE" --out "$OUT_DIR/train_tiny_llama.png" --json "$OUT_DIR/train_tiny_llama.json"

# The quick sweep takes what is left (at most T_PERF); when `timeout` stops
# it, it still writes the CSV and summary of what it measured.
run_step perf_quick "$(limit "$T_PERF" 0)" "$PY" -m perf --quick --device "$DEVICE" \
  --out "$OUT_DIR" --no-progress --warmup-ms 10 --rep-ms 40 \
  --ops ce_fwd_bwd,vocab_parallel,softmax_fwd_bwd,log_softmax_fwd,ce_fwd,softmax_fwd

# The tables of the run, into the log and device_check_summary.md.
newest() { ls -t "$@" 2>/dev/null | head -1; }
step_tables() {  # the markdown table lines a step printed
  sed -n "/^===== $1 (/,/^===== $1:/p" "$LOG" | grep '^|' || echo "(no table)"
}
{
  gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
  echo "# device check: ${gpu:-no GPU seen by nvidia-smi}"
  echo
  echo "Run $(date -u +%FT%TZ), $(( $(now) - START ))s in all (budget ${BUDGET}s), files in $OUT_DIR."
  echo
  echo "| step | result | time | limit |"
  echo "|---|---|---|---|"
  printf '%s\n' "${STEPS[@]}"
  echo
  echo "## GPU checks"
  step_tables gpu_checks
  for part in "tuning run:*_tune_summary.md" "fused linear + cross-entropy:*_linear_summary.md"; do
    echo
    echo "## ${part%%:*}"
    f=$(newest "$OUT_DIR"/${part#*:})
    if [ -n "$f" ]; then sed 's/^#/##/' "$f"; else echo "(no summary written)"; fi
  done
  echo
  echo "## quick sweep"
  f=$(ls -t "$OUT_DIR"/*_summary.md 2>/dev/null | grep -v -e '_tune' -e '_linear' -e 'device_check_' | head -1)
  if [ -n "$f" ]; then sed 's/^#/##/' "$f"; else echo "(no summary written)"; fi
  echo
  echo "## host cost per call (µs)"
  step_tables host
  echo
  echo "## hardware counters of the hot kernels (ncu)"
  step_tables profile
  echo
  echo "## a trainer's step (examples/train_tiny_llama.py)"
  step_tables llama
} > "$SUMMARY"
tee -a "$LOG" < "$SUMMARY"

# What comes back from a lent machine: at most 8 files, no deeper than 2
# folders, 16 MiB each. Keep the log, the summary, the table and the CSVs at
# the top (7 at most); everything else (plots, per-run summaries, any folder)
# goes into extras.tar.gz.
pack_out() {
  local dir=$1 kept=() rest=() f pat k seen
  find "$dir" -maxdepth 1 -type f -size +15M -name '*.csv' -exec gzip -f {} \;
  shopt -s nullglob
  for pat in device_check.log device_check_summary.md 'tuned_*.json' \
             '*_tune.csv' '*_tune_run*.csv' '*.csv' '*.csv.gz'; do
    for f in "$dir"/$pat; do
      seen=0
      for k in "${kept[@]}"; do [ "$k" = "$f" ] && seen=1; done
      [ "$seen" = 0 ] && [ "${#kept[@]}" -lt 7 ] && kept+=("$f")
    done
  done
  for f in "$dir"/* "$dir"/.[!.]*; do
    seen=0
    for k in "${kept[@]}"; do [ "$k" = "$f" ] && seen=1; done
    [ "$seen" = 0 ] && rest+=("$(basename "$f")")
  done
  shopt -u nullglob
  local n_top n_dirs
  n_top=$(find "$dir" -mindepth 1 -maxdepth 1 | wc -l)
  n_dirs=$(find "$dir" -mindepth 1 -maxdepth 1 -type d | wc -l)
  if [ "$n_top" -le 8 ] && [ "$n_dirs" -eq 0 ]; then return 0; fi
  [ "${#rest[@]}" -gt 0 ] || return 0
  (cd "$dir" && tar -czf extras.tar.gz.part -- "${rest[@]}" && rm -rf -- "${rest[@]}" \
    && mv extras.tar.gz.part extras.tar.gz) \
    && echo "packed ${#rest[@]} entries (plots, per-run summaries, folders) into $dir/extras.tar.gz"
}
if [ "$(stat -c %s "$LOG")" -gt 15000000 ]; then  # keep the end of an oversized log
  tail -c 15000000 "$LOG" > "$LOG.tail" && mv "$LOG.tail" "$LOG"
fi
pack_out "$OUT_DIR"
echo "files in $OUT_DIR:" && ls -la "$OUT_DIR"
exit "$FAILED"
