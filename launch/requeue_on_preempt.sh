# Requeue-on-preemption for the Slurm scripts (slurm.sbatch, sweep_array.sbatch); source it, then
#
#   requeue_on_preempt STATUS JOB
#
# after the step that runs the trainer. When STATUS is PREEMPTED_EXIT_CODE (the trainer saved after SIGTERM
# and stopped) it runs `scontrol requeue JOB` (a job id, or ARRAYJOB_TASK for one array task) and exits 0, so
# the job queues again and resumes from that checkpoint; otherwise it exits STATUS.

PREEMPTED_EXIT_CODE=42  # yanjax.core.cli.PREEMPTED_EXIT_CODE: the trainer exits with this after saving on SIGTERM/SIGINT

requeue_on_preempt() {
  local status=$1 job=$2
  if [[ ${status} -eq ${PREEMPTED_EXIT_CODE} ]]; then
    echo "trainer saved and stopped (exit ${status}): requeueing job ${job}"
    scontrol requeue "${job}"
    exit 0
  fi
  exit "${status}"
}
