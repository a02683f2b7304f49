#!/usr/bin/env bash
# Every GPU-marked test on this machine's GPUs, as three pytest processes side by side on the GPU (the
# suite run one file after another takes ~7 minutes; side by side ~3.5), each cut at $SUITE seconds
# (default 540). Logs, JUnit XMLs and the GPU's name go to $OUT (default /tmp/gpu_tests). With arguments,
# one pytest process takes them instead:
#   source .gpu-kit/activate.sh && bash scripts/gpu_jobs/gpu_tests.sh                                   # all
#   source .gpu-kit/activate.sh && bash scripts/gpu_jobs/gpu_tests.sh -k graphs tests/test_train_gpu.py  # some
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/gpu_tests}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
suite() {  # NAME PYTEST-ARGS...
  local name=$1
  shift
  timeout "${SUITE:-540}" python -m pytest -m gpu -q -rs -p no:cacheprovider --durations=10 \
    --junitxml="$out/$name.xml" "$@" > "$out/$name.log" 2>&1
  echo "$name: pytest exit $? ($(tail -1 "$out/$name.log"))"
  grep -E "^(FAILED|ERROR)" "$out/$name.log" | head -20
}
echo "GPU tests on $(cat "$out/gpu.txt")"
if [ $# -gt 0 ]; then
  suite gpu_tests "$@"
else
  suite upstream tests/test_upstream_gpu.py &
  suite train tests/test_train_gpu.py tests/test_cp_gpu.py &
  suite rest tests/test_model_gpu.py tests/test_keys_gpu.py tests/test_use_model_gpu.py \
    tests/test_preemption.py tests/test_validation.py &
  wait
fi
