#!/usr/bin/env bash
# Every GPU-marked test on this machine's GPUs, as three pytest processes side by side on the GPU (the
# suite run one file after another takes ~7 minutes; side by side ~3.5), each cut at $SUITE seconds
# (default 540). The summary goes to stdout and $OUT/gpu_tests.txt, the logs and JUnit XMLs to
# $OUT/gpu_tests.tgz (a device call brings back 8 files; default OUT /tmp/gpu_tests). With arguments, one
# pytest process takes them instead:
#   source .gpu-kit/activate.sh && bash scripts/gpu_jobs/gpu_tests.sh                                   # all
#   source .gpu-kit/activate.sh && bash scripts/gpu_jobs/gpu_tests.sh -k graphs tests/test_train_gpu.py  # some
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/gpu_tests}
logs=$(mktemp -d)
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$logs/gpu.txt" 2>&1
suite() {  # NAME PYTEST-ARGS...
  local name=$1
  shift
  timeout "${SUITE:-540}" python -m pytest -m gpu -q -rs -p no:cacheprovider --durations=10 \
    --junitxml="$logs/$name.xml" "$@" > "$logs/$name.log" 2>&1
  echo "$name: pytest exit $? ($(tail -1 "$logs/$name.log"))"
  grep -E "^(FAILED|ERROR)" "$logs/$name.log" | head -20
}
{
echo "GPU tests on $(cat "$logs/gpu.txt")"
if [ $# -gt 0 ]; then
  suite gpu_tests "$@"
else
  suite upstream tests/test_upstream_gpu.py &
  suite train tests/test_train_gpu.py tests/test_cp_gpu.py &
  suite rest tests/test_model_gpu.py tests/test_keys_gpu.py tests/test_use_model_gpu.py \
    tests/test_preemption.py tests/test_validation.py &
  wait
fi
} | tee "$out/gpu_tests.txt"
tar czf "$out/gpu_tests.tgz" -C "$logs" .
