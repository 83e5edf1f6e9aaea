#!/bin/bash
# Train on SLURM:  sbatch slurm/train_latent.sh CONFIG [key=value ...]
#
# One task per GPU (8 per node); srun starts them and dist_diffusion reads its rank, world size and
# master address from the SLURM environment. SLURM sends USR1 two minutes before the
# time limit (or on `scancel --signal=USR1`): every rank finishes its step, the run
# saves a checkpoint and exits 124, and this script requeues the job, which resumes
# from that checkpoint in the same run directory. Override any header line on the
# command line, e.g. `sbatch --nodes=4 --partition=a100 slurm/train_latent.sh ...`.
# GPUs are given per node, not per task: --gpus-per-task would bind one GPU to each task
# (each sees only "cuda:0") while rank r binds cuda:LOCAL_RANK, and NCCL would lose the
# peer GPUs it uses for NVLink. Keep --ntasks-per-node equal to --gpus-per-node.
#SBATCH --job-name=dd-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

config="${1:?usage: sbatch slurm/train_latent.sh CONFIG [key=value ...]}"
shift
cd "${SLURM_SUBMIT_DIR:-.}"  # submit from the checkout: configs/ and the venv are found from here
python="${DD_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python )}"

# Bad config: one message here, before any rank starts or any GPU is touched.
run_dir=$("$python" -m dist_diffusion.cli config "$config" "$@" --get train.run_dir) || exit 2
beside=$("$python" -m dist_diffusion.cli config "$config" "$@" --get eval.during_training) || exit 2

# eval.during_training: the eval watcher as a companion job on its own allocation (eval.cpus,
# eval.gpus), submitted once per training job (a requeued one finds it in the queue).
if [ "$beside" = "True" ]; then
  "$python" -m dist_diffusion.cli watch --check --config "$config" "$@" || exit 2
  mkdir -p "$run_dir/eval" && rm -f "$run_dir/eval/TRAINING_ENDED"
  companion="dd-eval-beside-$SLURM_JOB_ID"
  if [ -z "$(squeue -h -o %i --name "$companion")" ]; then
    cpus=$("$python" -m dist_diffusion.cli config "$config" "$@" --get eval.cpus)
    gpus=$("$python" -m dist_diffusion.cli config "$config" "$@" --get eval.gpus)
    sbatch --job-name="$companion" --cpus-per-task="$cpus" $( [ "$gpus" -gt 0 ] && echo "--gpus=$gpus" ) \
      --output="$run_dir/eval/slurm-%j.out" slurm/eval_beside.sh "$run_dir"
  fi
fi

# SLURM 22.05 to 23.02: srun does not inherit --cpus-per-task from the allocation, and
# each task would get one CPU (one core for the rank and all its loader workers).
[ -z "${SLURM_CPUS_PER_TASK:-}" ] || export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
echo "$(date -Is) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NTASKS tasks on $SLURM_JOB_NODELIST"
srun --kill-on-bad-exit=1 "$python" -m dist_diffusion.train "$config" "$@"
status=$?

# Preempted or out of time, checkpoint saved: run again. Exit code 124 says so, and so
# does RUN/REQUEUE naming this job (the code alone would not survive a wrapper such as
# torchrun, which turns it into 1).
marker="$run_dir/REQUEUE"
if [ "$status" -eq 124 ] || grep -qs "\"slurm_job_id\": \"$SLURM_JOB_ID\"" "$marker"; then
  rm -f "$marker"
  echo "$(date -Is) checkpoint saved; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
# Ended (done or failed): the companion watcher evaluates what is complete, then ends too.
[ "$beside" != "True" ] || date -Is > "$run_dir/eval/TRAINING_ENDED"
exit "$status"
