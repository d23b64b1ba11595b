#!/usr/bin/env bash
# Fill .whl/ with the peers' wheels for the GPU machine, which has no network.
#
#   bash perf/fetch_wheels.sh [DIR]     # default: .whl (ignored by git)
#
# Then pass carry [".whl"] to the device run; perf/device_check.sh installs
# them (--no-deps) into /tmp/site there. The GPU machine has Python 3.12 and
# its own torch and Triton, so only the peers themselves travel, pure-Python
# wheels of ~1 MB in all:
#   liger-kernel, cut-cross-entropy.
# QuACK (quack-kernels) does not travel: it needs the CuTe DSL, whose CUDA
# libraries wheel alone (nvidia-cutlass-dsl-libs-cu12 4.8.1) is 92 MB,
# beyond the 64 MiB a run may carry; the sweep reports it as not importable.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIR="${1:-.whl}"
mkdir -p "$DIR"
PY="${PYTHON:-python3}"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 -d "$DIR" liger-kernel cut-cross-entropy
du -sh "$DIR"
ls "$DIR"
