#!/usr/bin/env bash
# Train on every worker of a Cloud TPU pod slice: one lca-train process per host.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG [key=value ...]
#   e.g. launch/tpu_pod.sh my-v5p-64 us-east5-a configs/base.yaml mesh.fsdp=-1 mesh.data=1 run_dir=gs://bucket/runs/a
#
# Every host runs the same command; jax.distributed.initialize() (called by
# lca-train when it detects a multi-host TPU) connects them into one job and the
# mesh spans all chips. The repository must be at ~/lca on every worker (first
# run: launch/tpu_pod.sh ... with SETUP=1 to clone/install). run_dir should be
# shared storage (a gs:// bucket or NFS) so that checkpoints are visible to all hosts.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,12p' "$0"
  exit 2
fi
TPU_NAME=$1
ZONE=$2
shift 2
ARGS=$(printf ' %q' "$@")
REPO_URL=${REPO_URL:-https://github.com/your-org/lca.git}

if [[ ${SETUP:-0} == 1 ]]; then
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
    set -e
    [ -d ~/lca ] || git clone $REPO_URL ~/lca
    cd ~/lca && python3 -m pip install -q -e '.[tpu]'"
fi

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd ~/lca && python3 -m launch.train$ARGS runtime.distributed=on"
