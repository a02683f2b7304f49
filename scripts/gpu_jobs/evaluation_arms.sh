#!/usr/bin/env bash
# benchmarks/evaluation.md's figures on one GPU: scripts/benchmark_evaluation.py with its training arms side by
# side, one process per arm sharing the GPU. The first arm runs in full (Markov baselines, the in-sample set,
# scoring throughput), the others --arms-only; when all are done, one report of every arm (--report-only).
#   source .gpu-kit/activate.sh && bash scripts/gpu_jobs/evaluation_arms.sh default rc og2init
# Arms by name (ARM below). Environment:
#   RAGOUT        ragout-examples' E.Coli, S.Aureus, V.Cholerae and H.Pylori references (default .ragout)
#   BODY          model overrides of every arm (default: the 25M body below, which learns more than L1's 1B
#                 body in a 10-minute device call)
#   STEPS         training steps of each arm (default auto: a 40-step probe alone on the GPU times a step, and
#                 each arm gets the steps that fill TRAIN_SECONDS, default 180, while GPU_SHARERS processes
#                 share the GPU, default the number of arms; rounded down to hundreds)
#   LIMIT         seconds for the whole job, probe included (default 560): what finished by then is reported
#   EXTRA         more benchmark_evaluation.py options (split on spaces)
#   ARMS_ONLY=1   every arm --arms-only (arms added to an earlier call's report)
#   OUT           where the tarball of everything (evaluation.tgz) and the report go (default /tmp/evaluation_arms)
set -uo pipefail
SECONDS=0
cd "$(dirname "$0")/../.."
declare -A ARM=(
  [default]=""
  [rc]="dataset.reverse_complement_prob=0.5"
  [og2init]="spike_no_more_embedding_init=true use_megatron_scaled_init=true"
)
BODY=${BODY:-config_kwargs.hidden_size=512 config_kwargs.intermediate_size=1536 config_kwargs.num_hidden_layers=8 \
config_kwargs.num_attention_heads=8 config_kwargs.num_key_value_heads=4 config_kwargs.head_dim=64}
out=${OUT:-/tmp/evaluation_arms}
work=/tmp/evaluation_arms_work
mkdir -p "$out" "$work"
[ $# -gt 0 ] || set -- default
first=$1
if [ "${STEPS:-auto}" = auto ]; then
  python train_fsdp2.py --config-name L1_genomic_1b $BODY num_train_steps=40 logger.frequency=10 \
    dataset.load_dataset_kwargs.path="${RAGOUT:-.ragout}/examples/E.Coli/references" run_dir="$work/probe" \
    > "$work/probe.log" 2>&1 || { echo "the probe failed:"; tail -20 "$work/probe.log"; exit 1; }
  STEPS=$(python - "$work/probe/metrics.jsonl" "${TRAIN_SECONDS:-180}" "${GPU_SHARERS:-$#}" <<'PY'
import json, sys
logged = [json.loads(line) for line in open(sys.argv[1])]
step_s = max(e["step_time_s"] for e in logged[1:] if "step_time_s" in e)  # after the first window: warm-up
print(max(int(float(sys.argv[2]) / (step_s * int(sys.argv[3])) // 100 * 100), 100))
PY
  )
  echo "probe: $(tail -1 "$work/probe/metrics.jsonl" | cut -c1-160); STEPS=$STEPS"
fi
for name in "$@"; do
  [ -n "${ARM[$name]+x}" ] || { echo "unknown arm '$name': one of ${!ARM[*]}"; exit 2; }
  only=$([ "$name" = "$first" ] && [ -z "${ARMS_ONLY:-}" ] || echo --arms-only)
  timeout $((${LIMIT:-560} - SECONDS)) python scripts/benchmark_evaluation.py --ragout "${RAGOUT:-.ragout}" \
    --steps "$STEPS" --overrides "$BODY" --arm "$name=${ARM[$name]}" $only ${EXTRA:-} \
    --work "$work/$name" --out "$work/out_$name" > "$work/$name.log" 2>&1 &
done
wait
report=$work/out_$first
for name in "$@"; do
  cp "$work/out_$name"/evaluation_arms/*.json "$report/evaluation_arms/" 2>/dev/null
done
[ -f "$report/evaluation.json" ] && python scripts/benchmark_evaluation.py --report-only --out "$report" > /dev/null
cp "$report"/evaluation.md "$out/" 2>/dev/null
tar czf "$out/evaluation.tgz" -C "$work" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.distcp' .
for name in "$@"; do echo "== $name"; tail -3 "$work/$name.log"; done
if [ -n "${ARMS_ONLY:-}" ]; then
  cat "$work"/out_*/evaluation_arms/*.json
else
  cat "$out/evaluation.md" 2>/dev/null || echo "no report: the first arm ($first) was cut before its bits per base; logs in the tarball"
fi
