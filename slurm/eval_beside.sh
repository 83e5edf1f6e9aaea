#!/bin/bash
# Evaluate a training run's checkpoints as they appear, on an allocation of its own:
#   sbatch slurm/eval_beside.sh RUN_DIR
# slurm/train_latent.sh submits this for you when the recipe has eval.during_training=true,
# sized by eval.cpus and eval.gpus. The watcher (`dist-diffusion watch`) evaluates each due
# checkpoint's EMA into RUN_DIR/eval/step-NNNNNN/ and redraws RUN_DIR/eval/curve.png; it ends
# once the training job marks the run ended (RUN_DIR/eval/TRAINING_ENDED) and nothing is
# left, or after eval.idle_minutes without a checkpoint. Preempted or out of time, it stops
# at a shard boundary (finished shards and steps are kept), exits 124 and requeues itself;
# a second watcher on the same run leaves at once.
#SBATCH --job-name=dd-eval-beside
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

run_dir="${1:?usage: sbatch slurm/eval_beside.sh RUN_DIR}"
cd "${SLURM_SUBMIT_DIR:-.}"  # submit from the checkout
python="${DD_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python )}"
[ -z "${SLURM_CPUS_PER_TASK:-}" ] || export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
echo "$(date -Is) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): evaluating $run_dir beside training"
srun --ntasks=1 "$python" -m dist_diffusion.cli watch --run-dir "$run_dir" --until-marked
status=$?
if [ "$status" -eq 124 ]; then
  echo "$(date -Is) stopped at a shard boundary; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
