#!/bin/bash
# Multi-node prefopt run (what one Hydra submitit job cannot express): one torchrun per node, 8 processes each.
#
#   sbatch --nodes=2 -p PARTITION -A ACCOUNT launchers/sbatch_torchrun.sh model=llama3_8b loss=bpo beta=0.1
#
# The arguments are prefopt overrides. The run directory is fixed by the job id, so when the job is requeued
# (time limit, preemption, node failure) it runs again in the same directory and `resume: auto` continues
# from the newest complete checkpoint there; the W&B run id stored in <run_dir>/wandb_id keeps the same run.
#
# --requeue allows `scontrol requeue` (and requeue on preemption). --signal=B:USR1@120 sends USR1 to this batch
# shell (B:) 120 s before the time limit: it requeues the job (sent to the job steps, it would kill torchrun).
# --open-mode=append: a requeued job appends to the same log. Partition, account, qos: sbatch -p / -A / --qos.
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
run_dir="outputs/slurm/$SLURM_JOB_ID"  # the same after a requeue: the job keeps its id
echo "prefopt: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_NNODES nodes;" \
     "head $head_node; run dir $run_dir"

requeue() {
    echo "prefopt: time limit near; requeueing job $SLURM_JOB_ID (it resumes from $run_dir/checkpoints)"
    scontrol requeue "$SLURM_JOB_ID"
}
trap requeue USR1

# In the background, so that bash runs the trap as soon as USR1 arrives (it waits for foreground commands).
srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" --nproc_per_node 8 \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head_node:29500" \
    -m prefopt.run hardware=fsdp hydra.run.dir="$run_dir" "$@" &
srun_pid=$!
wait "$srun_pid"
status=$?
if [ "$status" -gt 128 ]; then  # interrupted by the signal: wait for srun to be torn down by the requeue
    wait "$srun_pid"
    status=$?
fi
exit "$status"
