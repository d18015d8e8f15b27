#!/usr/bin/env bash
# The GPU study (configs/study_gpu.yaml) in one call of the `device` tool.
#
# Here, once per checkout (CPU, a few minutes):
#   bash tools/gpu_study.sh prepare
# fetches tools/gpu_wheels.txt as CPython 3.12 wheels into .whl/, builds the
# data set and the study's tokenizer into data_cache/, and counts its tokens
# into runs/study_gpu/docs/ledger/study.json, so the lent machine spends its
# minutes on training. Then, on the lent machine:
#   run(command="bash tools/gpu_study.sh run", timeout_s=600,
#       carry=[".whl", "data_cache", "runs/study_gpu"])
# installs the wheels, trains the study for at most STUDY_SECONDS (default
# 470; JOBS processes, default 3, each with a third of the GPU's memory),
# writes its report and leaves in $OUT: study.log, and study.tgz (the report
# and every run's summary, config and metrics; no checkpoints). A study cut
# short by STUDY_SECONDS reports the runs that finished (the next machine is
# bare: the rest does not resume there) and exits 3.
# `run CONFIG` runs another study the same way (configs/study_quick.yaml is
# the smoke test of this script on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
config=${2:-configs/study_gpu.yaml}

case "$mode" in
  prepare)
    rm -rf .whl
    mkdir -p .whl
    grep -v '^#' tools/gpu_wheels.txt | while read -r req; do
      [ -n "$req" ] || continue
      python3 -m pip download -q --no-deps --only-binary=:all: \
          --python-version 3.12 --implementation cp \
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
          --platform manylinux1_x86_64 -d .whl "$req" 2>/dev/null ||
        python3 -m pip wheel -q --no-deps -w .whl "$req"
    done
    PYTHONPATH=$PWD python3 -c "
import sys
from train.study.config import load_study
from train.study.run import prepare_data
prepare_data(load_study(sys.argv[1]), print)" "$config"
    ;;
  run)
    : "${OUT:?run on the device machine, where OUT is set}"
    python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    python3 -c 'import jax; print("devices:", jax.devices())' |
        tee "$OUT/study.log"
    dirs=$(python3 -c "
import sys
from train.study.config import load_study
study = load_study(sys.argv[1])
inside = study.docs_dir.resolve().is_relative_to(study.output_dir.resolve())
print(study.output_dir, '' if inside else study.docs_dir)" "$config")
    pack() {  # Whatever else fails, the runs come back.
      tar czf "$OUT/study.tgz" --exclude='checkpoints*' --exclude=tensorboard \
          --ignore-failed-read $dirs
    }
    set +e
    XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.3} \
      timeout --signal=TERM --kill-after=40 "${STUDY_SECONDS:-470}" \
      python3 -m train.study --config "$config" --jobs "${JOBS:-3}" 2>&1 |
        tee -a "$OUT/study.log"
    status=${PIPESTATUS[0]}
    pack
    python3 -m train.study --config "$config" --report-only 2>&1 |
        tee -a "$OUT/study.log"
    pack
    if [ "$status" = 124 ] || [ "$status" = 137 ]; then
      echo "cut short at STUDY_SECONDS=${STUDY_SECONDS:-470}" |
          tee -a "$OUT/study.log"
      exit 3  # Not 124/137: the device tool reads those as its own limit.
    fi
    exit "$status"
    ;;
  *)
    echo "usage: bash tools/gpu_study.sh prepare|run [STUDY_CONFIG]" >&2
    exit 2
    ;;
esac
