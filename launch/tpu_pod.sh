#!/usr/bin/env bash
# Trains on a Cloud TPU pod slice (TPU VMs): one process per host, all started
# at once with `gcloud compute tpus tpu-vm ssh --worker=all`; inside,
# `python -m skipnet_jax.main --multihost` lets jax.distributed.initialize()
# find the other hosts by itself.
#
#   launch/tpu_pod.sh create            # the TPU VMs
#   launch/tpu_pod.sh setup             # code + packages + bucket mount on every worker
#   launch/tpu_pod.sh train [-- --config.KEY=VALUE ...]
#   launch/tpu_pod.sh logs              # follow worker 0's log
#   launch/tpu_pod.sh delete
#
# Settings (environment variables; the first three have no default):
#   PROJECT, ZONE, BUCKET   GCP project, TPU zone, and a GCS bucket name (no gs://)
#   TPU_NAME=skipnet  ACCELERATOR_TYPE=v4-32  RUNTIME_VERSION=tpu-ubuntu2204-base
#   CONFIG=configs/imagenet_m.py   RUN=<config name>-<date>   PYTHON_VERSION=3.12
#
# The bucket is mounted with gcsfuse at /mnt/$BUCKET on every worker, and both
# the TFDS data_dir (/mnt/$BUCKET/tensorflow_datasets, holding an
# array_record-prepared imagenet2012, see launch/README.md) and the workdir
# (/mnt/$BUCKET/runs/$RUN) live there: every host must see the same workdir
# for multi-host orbax checkpoints, and ArrayRecord (TFDS random access) cannot
# open gs:// paths itself.
set -euo pipefail

: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET (name, without gs://)}"
TPU_NAME=${TPU_NAME:-skipnet}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/imagenet_m.py}
RUN=${RUN:-$(basename "$CONFIG" .py)-$(date +%Y%m%d-%H%M%S)}
MOUNT=/mnt/${BUCKET}
REMOTE_DIR=skipnet_jax  # under each worker's home directory
# TPU VM images ship Python 3.10, older than the package supports (3.11-3.13): setup makes a
# virtualenv with a Python 3.12 fetched by uv, and training runs that interpreter.
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
VENV=skipnet-venv  # under each worker's home directory

repo_root=$(cd "$(dirname "$0")/.." && pwd)
tpu=(gcloud compute tpus tpu-vm --project="$PROJECT" --zone="$ZONE")

on_all_workers() {
  "${tpu[@]}" ssh "$TPU_NAME" --worker=all --command="$1"
}

create() {
  "${tpu[@]}" create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
}

setup() {
  local archive
  archive=$(mktemp --suffix=.tar.gz)
  # The committed tree (no virtualenvs or local outputs).
  git -C "$repo_root" archive --format=tar.gz -o "$archive" HEAD
  "${tpu[@]}" scp "$archive" "$TPU_NAME":skipnet_jax.tar.gz --worker=all
  rm -f "$archive"
  on_all_workers "set -e
    rm -rf ~/${REMOTE_DIR} && mkdir -p ~/${REMOTE_DIR} && tar -xzf ~/skipnet_jax.tar.gz -C ~/${REMOTE_DIR}
    python3 -m pip install --user --upgrade uv
    ~/.local/bin/uv venv --python ${PYTHON_VERSION} --seed --allow-existing ~/${VENV}
    ~/.local/bin/uv pip install --python ~/${VENV}/bin/python -e \"\$HOME/${REMOTE_DIR}[tpu]\"
    ~/${VENV}/bin/python -c 'import jax; assert jax.default_backend() == \"tpu\", jax.devices()'
    if ! command -v gcsfuse >/dev/null; then
      echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" |
        sudo tee /etc/apt/sources.list.d/gcsfuse.list
      curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
      sudo apt-get update && sudo apt-get install -y gcsfuse
    fi
    sudo mkdir -p ${MOUNT} && sudo chown \$(id -u):\$(id -g) ${MOUNT}
    mountpoint -q ${MOUNT} || gcsfuse --implicit-dirs ${BUCKET} ${MOUNT}"
}

train() {
  local extra="" arg
  for arg in "$@"; do
    extra+=" $(printf '%q' "$arg")"
  done
  # Started in the background on every host (it survives the ssh session);
  # each host logs to ~/train.log.
  on_all_workers "cd ~/${REMOTE_DIR} && mkdir -p ${MOUNT}/runs && \
    nohup ~/${VENV}/bin/python -m skipnet_jax.main --multihost --config=${CONFIG} \
      --workdir=${MOUNT}/runs/${RUN} --config.data_dir=${MOUNT}/tensorflow_datasets${extra} \
      > ~/train.log 2>&1 < /dev/null &"
  echo "started run ${RUN}; workdir gs://${BUCKET}/runs/${RUN}; follow it with: $0 logs"
}

logs() {
  "${tpu[@]}" ssh "$TPU_NAME" --worker=0 --command="tail -F ~/train.log"
}

delete() {
  "${tpu[@]}" delete "$TPU_NAME" --quiet
}

command=${1:-}
shift || true
[[ ${1:-} == "--" ]] && shift
case $command in
  create | setup | logs | delete) "$command" ;;
  train) train "$@" ;;
  *)
    echo "usage: $0 create|setup|train [-- --config.KEY=VALUE ...]|logs|delete" >&2
    exit 2
    ;;
esac
