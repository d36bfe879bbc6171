#!/usr/bin/env bash
# yanjax training on every worker of a Cloud TPU VM slice: one trainer process per worker.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh configs/yan_1p6b.py gs://my-bucket/runs/yan_1p6b [--config.k=v ...]
#
# Copies this checkout's HEAD commit to every worker, installs it with the TPU build of jax into a
# Python 3.11 venv (made with uv, since TPU VM images ship an older Python), then runs the trainer on
# all workers at once; JAX finds the slice's workers itself. The workdir must be a gs:// path (or
# storage every worker mounts); the same command run again resumes from its last checkpoint.
# Optional: PROJECT=<gcloud project>. Run `ssh-add ~/.ssh/google_compute_engine` first (gcloud needs
# the key in an agent for --worker=all).
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: TPU_NAME=... ZONE=... launch/tpu_pod.sh CONFIG WORKDIR [trainer flags ...]" >&2
  exit 2
fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
config=$1
workdir=$2
shift 2

gcloud_args=(--zone="${ZONE}" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then
  gcloud_args+=(--project="${PROJECT}")
fi

cd "$(git rev-parse --show-toplevel)"
if ! git diff --quiet HEAD; then
  echo "tpu_pod.sh: uncommitted changes are not copied; running commit $(git rev-parse --short HEAD)" >&2
fi
tmp=$(mktemp -d)
trap 'rm -rf "${tmp}"' EXIT
git archive --format=tar.gz -o "${tmp}/yanjax.tar.gz" HEAD
gcloud compute tpus tpu-vm scp "${tmp}/yanjax.tar.gz" "${TPU_NAME}:yanjax.tar.gz" "${gcloud_args[@]}"

setup='set -euo pipefail
export PATH="$HOME/.local/bin:$PATH"
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
rm -rf ~/yanjax && mkdir ~/yanjax && tar -xzf ~/yanjax.tar.gz -C ~/yanjax
[[ -x ~/yanjax-venv/bin/python ]] || uv venv --python 3.11 ~/yanjax-venv
uv pip install --python ~/yanjax-venv/bin/python -e ~/yanjax "jax[tpu]"'
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${gcloud_args[@]}" --command="${setup}"

trainer_args=$(printf ' %q' --config "${config}" --workdir "${workdir}" "$@")
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${gcloud_args[@]}" \
  --command="cd ~/yanjax && PYTHONUNBUFFERED=1 ~/yanjax-venv/bin/python -m yanjax.main.train${trainer_args}"
