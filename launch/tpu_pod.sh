#!/usr/bin/env bash
# A TPU pod slice: the same command on every worker; jax.distributed.initialize() auto-detects the
# slice, each host reads its own data shards, orbax writes one checkpoint from all hosts.
#   TPU=my-v5e-256 ZONE=us-west4-a STAGE=1 DATA=/mnt/allava INIT=gs://bucket/ckpt/phi2_clip336 \
#   WORKDIR=gs://bucket/runs/s1 bash launch/tpu_pod.sh [extra --config.* flags]
# WORKDIR must be storage every worker sees (GCS or a shared filesystem); so must DATA.
# Run it again after a preemption: training resumes from the latest checkpoint.
set -euo pipefail
TPU=${TPU:?set TPU to the TPU VM name}
ZONE=${ZONE:?set ZONE}
STAGE=${STAGE:-1}
DATA=${DATA:?set DATA (visible on every worker)}
INIT=${INIT:?set INIT (stage 1: a convert import checkpoint; stage 2: stage 1 workdir)}
WORKDIR=${WORKDIR:?set WORKDIR (visible on every worker)}
REPO=${REPO:-allava-jax}
EXTRA=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "${TPU}" --zone "${ZONE}" --worker=all --command "
  cd ${REPO} && python -m allava_jax.train --config configs/allava_stage${STAGE}.py:${DATA} \
    --workdir ${WORKDIR} --config.init_from=${INIT} ${EXTRA}"
