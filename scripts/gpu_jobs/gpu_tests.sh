#!/usr/bin/env bash
# Every GPU-marked test on this machine's GPUs, cut at $SUITE seconds (default 540); the log, a JUnit XML and
# the GPU's name go to $OUT (default /tmp/gpu_tests). Extra arguments go to pytest:
#   source .gpu-kit/activate.sh && bash scripts/gpu_jobs/gpu_tests.sh              # the whole GPU suite
#   source .gpu-kit/activate.sh && bash scripts/gpu_jobs/gpu_tests.sh -k graphs    # some of it
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/gpu_tests}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
timeout "${SUITE:-540}" python -m pytest -m gpu -q -rs -p no:cacheprovider --durations=15 \
  --junitxml="$out/gpu_tests.xml" "$@" tests > "$out/gpu_tests.log" 2>&1
status=$?
echo "GPU tests: pytest exit $status$([ $status = 124 ] && echo " (cut at ${SUITE:-540} s)") on $(cat "$out/gpu.txt")"
grep -E "passed|failed|error" "$out/gpu_tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$out/gpu_tests.log" | head -20
exit $status
