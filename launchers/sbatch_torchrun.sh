#!/bin/bash
# Multi-node prefopt run (what one Hydra submitit job cannot express): one torchrun per node, 8 processes each.
#
#   sbatch --nodes=2 -p PARTITION -A ACCOUNT launchers/sbatch_torchrun.sh model=llama3_8b loss=bpo beta=0.1
#
# The arguments are prefopt overrides (`hardware=fsdp` unless one of them names another `hardware=`). Processes
# per node: NPROC_PER_NODE, else the node's GPUs (SLURM_GPUS_ON_NODE), else 8. On CPU nodes, e.g.
#   NPROC_PER_NODE=2 sbatch --nodes=1 --gpus-per-node=0 --cpus-per-task=2 launchers/sbatch_torchrun.sh hardware=ddp
# The run directory is fixed by the job id, so when the job is requeued (time limit, preemption, node failure)
# it runs again in the same directory and `resume: auto` continues from the newest complete checkpoint there;
# the W&B run id stored in <run_dir>/wandb_id keeps the same run.
#
# Time limit: --signal=B:USR1@120 sends USR1 to this batch shell (B:) 120 s before the limit (SLURM checks
# every 30 s, so it may come up to 30 s earlier). The shell sends SIGTERM to the job's steps (torchrun hands it
# to its workers; every rank checkpoints at the end of its current step and exits), waits for them, then
# requeues the job. Preemption or `scontrol requeue`: SLURM sends SIGTERM itself and kills what is left after
# its KillWait; torchrun kills workers that have not exited 30 s after its own SIGTERM.
# --requeue allows requeueing; --open-mode=append: a requeued job appends to the same log.
#SBATCH --job-name=prefopt
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out

set -uo pipefail

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
port=$((20000 + SLURM_JOB_ID % 20000))  # per job: two jobs sharing a node do not collide
nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
hardware="hardware=fsdp"
for arg in "$@"; do case "$arg" in hardware=*) hardware="" ;; esac; done
run_dir="outputs/slurm/$SLURM_JOB_ID"  # the same after a requeue: the job keeps its id
echo "prefopt: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_NNODES nodes x $nproc processes;" \
     "head $head_node:$port; run dir $run_dir"

stopping=0
time_limit() {
    echo "prefopt: time limit near; every rank checkpoints at the end of its step, then job $SLURM_JOB_ID is requeued"
    stopping=1
    scancel --signal=TERM "$SLURM_JOB_ID"  # the job's steps only, not this shell
}
trap time_limit USR1
trap 'echo "prefopt: SIGTERM (preemption or requeue): waiting for the ranks to checkpoint"' TERM

# In the background, so that bash runs a trap as soon as its signal arrives (it waits for foreground commands).
srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" --nproc_per_node "$nproc" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head_node:$port" \
    -m prefopt.run $hardware hydra.run.dir="$run_dir" "$@" &
srun_pid=$!
while :; do
    wait "$srun_pid"
    status=$?
    # > 128: `wait` was interrupted by a trapped signal while srun goes on; wait again
    if [ "$status" -gt 128 ] && kill -0 "$srun_pid" 2>/dev/null; then continue; fi
    break
done
if [ "$stopping" = 1 ] && [ "$status" -ne 0 ]; then
    echo "prefopt: requeueing job $SLURM_JOB_ID (it resumes from $run_dir/checkpoints)"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
