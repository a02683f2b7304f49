#!/usr/bin/env bash
# One node's part of a multi-node run: torchrun for this node, with the scheduler's warning passed to the ranks.
#
#   srun --ntasks-per-node=1 launch/torchrun_node.sh train_fsdp2.py --config-name L2_lingua_1b ...   # SLURM
#   NNODES=2 NODE_RANK=... MASTER_ADDR=host0 launch/torchrun_node.sh train_fsdp2.py ...              # by hand
#
# The rendezvous comes from SLURM's environment (the job's first node, port MASTER_PORT or 29500) or from
# MASTER_ADDR/MASTER_PORT; nodes from NNODES or SLURM_JOB_NUM_NODES; ranks per node from NPROC_PER_NODE or
# SLURM_GPUS_ON_NODE (else 1). Why a wrapper: torchrun has no handler for SIGUSR1 (it would die of it) and
# answers SIGTERM by exiting 1 even when every rank saved. Here torchrun ignores both and either signal goes
# to the ranks themselves (torchrun's children): they save the current step and exit 0
# (runtime/preemption.py), and so does torchrun.
set -u
trap '' USR1 TERM  # torchrun inherits "ignore": a signal to the whole task (srun, kill -- -PGID) reaches the ranks only
nnodes=${NNODES:-${SLURM_JOB_NUM_NODES:-1}}
nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
host=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1)}
"${PYTHON:-python}" -m torch.distributed.run --nnodes="$nnodes" --nproc_per_node="$nproc" --rdzv_backend=c10d \
  --rdzv_endpoint="${host:-localhost}:${MASTER_PORT:-29500}" --rdzv_id="${SLURM_JOB_ID:-recipe}" "$@" &
torchrun_pid=$!
trap 'pkill -USR1 -P "$torchrun_pid"' USR1
trap 'pkill -TERM -P "$torchrun_pid"' TERM
# `wait` also returns (status > 128) when a trapped signal arrives: wait on until torchrun has ended.
while true; do
  wait "$torchrun_pid"
  status=$?
  kill -0 "$torchrun_pid" 2>/dev/null && continue
  if [ "$status" -gt 128 ]; then  # the signal came as torchrun ended: its own status is still to be collected
    wait "$torchrun_pid" 2>/dev/null
    last=$?
    [ "$last" != 127 ] && status=$last
  fi
  break
done
exit "$status"
