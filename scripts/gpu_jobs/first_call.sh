#!/usr/bin/env bash
# The first device call of a session: the GPU test suite side by side with the evaluation's default arm (the
# 25M body leaves the GPU room for the tests). Results under $OUT/tests and $OUT/evaluation; the arm is cut at
# 540 s (LIMIT) so that the call, the kit's ~15 s install on a fresh machine included, ends inside 600 s.
#   run: source .gpu-kit/activate.sh && bash scripts/gpu_jobs/first_call.sh    carry: .gpu-kit .ragout
set -uo pipefail
cd "$(dirname "$0")/../.."
# Three Markov baselines, not five: the last such call was cut inside the variant-effect step.
OUT=$OUT/evaluation LIMIT=${LIMIT:-540} EXTRA=${EXTRA:---markov-orders 0,5,8} \
  bash scripts/gpu_jobs/evaluation_arms.sh default > "$OUT/evaluation.txt" 2>&1 &
OUT=$OUT/tests SUITE=${SUITE:-480} bash scripts/gpu_jobs/gpu_tests.sh
wait
cat "$OUT/evaluation.txt"
