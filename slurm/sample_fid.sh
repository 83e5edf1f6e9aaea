#!/bin/bash
# Evaluate on SLURM:  sbatch slurm/sample_fid.sh CONFIG eval.unet=DIR [key=value ...]
#
# One task per GPU (8 per node). Each task samples its share of the shards (shard k on task
# k mod ntasks), the tasks reduce feature sums into FID / IS / class accuracy, and task 0
# writes OUT/report.json and report.md. Samples depend only on (seed, index), so the
# result does not depend on the task count; a requeued or resubmitted job skips the
# shards already complete in eval.out. GPUs are given per node (every task sees all of
# its node's GPUs and binds cuda:LOCAL_RANK); --gpus-per-task would hide them.
#SBATCH --job-name=dd-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

config="${1:?usage: sbatch slurm/sample_fid.sh CONFIG eval.unet=DIR [key=value ...]}"
shift
cd "${SLURM_SUBMIT_DIR:-.}"  # submit from the checkout
python="${DD_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python )}"

"$python" -m dist_diffusion.cli config "$config" "$@" >/dev/null || exit 2
# SLURM 22.05 to 23.02: srun does not inherit --cpus-per-task from the allocation, and
# each task would get one CPU (one core for the rank and all its loader workers).
[ -z "${SLURM_CPUS_PER_TASK:-}" ] || export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
echo "$(date -Is) job $SLURM_JOB_ID: $SLURM_NTASKS sampling tasks on $SLURM_JOB_NODELIST"
srun --kill-on-bad-exit=1 "$python" -m dist_diffusion.cli eval --config "$config" "$@"
