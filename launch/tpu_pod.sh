#!/usr/bin/env bash
# A TPU pod slice: the same command on every worker; jax.distributed.initialize() auto-detects the
# slice, each host reads its own data shards, orbax writes one checkpoint from all hosts.
#
#   TPU=my-v5e-256 ZONE=us-west4-a STAGE=1 DATA=gs://bucket/allava INIT=gs://bucket/ckpt/phi2_clip336 \
#   WORKDIR=gs://bucket/runs/s1 bash launch/tpu_pod.sh [--retries N] [extra --config.* flags]
#
# Before each run it copies this checkout (git HEAD) to every worker and installs it there with its
# requirements and jax[tpu] (fresh workers are bare; pip skips what is installed). WORKDIR (and
# DATA, INIT) must be storage every worker sees: a bucket (gs://) or a shared filesystem.
#
# Spot / preemptible slices: --retries N (or RETRIES=N) reruns the same command after a failed or
# preempted run, up to N times: it waits until the slice is READY again (polling every
# RETRY_WAIT_S seconds, at most WAIT_ROUNDS times), and when the slice is PREEMPTED or gone and
# ACCELERATOR_TYPE and RUNTIME_VERSION are set it deletes and recreates it (--spot when SPOT=1).
# Training resumes from WORKDIR's latest checkpoint. A run is done when it exits 0 on a READY slice
# without having saved a preemption checkpoint (training exits 0 after one too).
set -euo pipefail
RETRIES=${RETRIES:-0}
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --retries) RETRIES=$2; shift 2 ;;
    --retries=*) RETRIES=${1#*=}; shift ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
TPU=${TPU:?set TPU to the TPU VM name}
ZONE=${ZONE:?set ZONE}
STAGE=${STAGE:-1}
DATA=${DATA:?set DATA (visible on every worker)}
INIT=${INIT:?set INIT (stage 1: a convert import checkpoint; stage 2: stage 1 workdir)}
WORKDIR=${WORKDIR:?set WORKDIR (visible on every worker, e.g. gs://bucket/runs/s1)}
REPO=${REPO:-allava-jax}
JAX_TPU=${JAX_TPU:-jax[tpu]==0.10.2}
RETRY_WAIT_S=${RETRY_WAIT_S:-60}
WAIT_ROUNDS=${WAIT_ROUNDS:-120}
HERE=$(cd "$(dirname "$0")/.." && pwd)
QUOTED_EXTRA=""
if [ ${#EXTRA[@]} -gt 0 ]; then QUOTED_EXTRA=$(printf ' %q' "${EXTRA[@]}"); fi

tpu() { gcloud compute tpus tpu-vm "$@" --zone "${ZONE}"; }

state() { tpu describe "${TPU}" --format='value(state)' 2>/dev/null || echo MISSING; }

install() {
  local archive
  archive=$(mktemp --suffix .tar.gz)
  git -C "${HERE}" archive --format=tar.gz -o "${archive}" HEAD
  tpu scp "${archive}" "${TPU}:allava-jax.tar.gz" --worker=all
  rm -f "${archive}"
  tpu ssh "${TPU}" --worker=all --command "mkdir -p ${REPO} && tar xzf allava-jax.tar.gz -C ${REPO} && \
    cd ${REPO} && pip install -q -r requirements.txt '${JAX_TPU}'"
}

train() {
  tpu ssh "${TPU}" --worker=all --command "cd ${REPO} && python -m allava_jax.train \
    --config configs/allava_stage${STAGE}.py:${DATA} --workdir ${WORKDIR} --config.init_from=${INIT}${QUOTED_EXTRA}"
}

wait_ready() {
  local s
  for _ in $(seq "${WAIT_ROUNDS}"); do
    s=$(state)
    case "${s}" in
      READY) return 0 ;;
      PREEMPTED|MISSING|TERMINATED)
        if [ -n "${ACCELERATOR_TYPE:-}" ] && [ -n "${RUNTIME_VERSION:-}" ]; then
          echo "tpu_pod.sh: ${TPU} is ${s}; recreating it" >&2
          [ "${s}" = MISSING ] || tpu delete "${TPU}" --quiet || true
          tpu create "${TPU}" --accelerator-type "${ACCELERATOR_TYPE}" --version "${RUNTIME_VERSION}" \
            ${SPOT:+--spot} || true
        fi ;;
    esac
    echo "tpu_pod.sh: ${TPU} is ${s}; waiting ${RETRY_WAIT_S}s" >&2
    sleep "${RETRY_WAIT_S}"
  done
  echo "tpu_pod.sh: ${TPU} did not become READY" >&2
  return 1
}

LOG=$(mktemp)
trap 'rm -f "${LOG}"' EXIT
attempt=0
while :; do
  rc=0
  { install && train 2>&1 | tee "${LOG}"; } || rc=$?
  if [ "${rc}" -eq 0 ] && ! grep -q "preempted: checkpoint at step" "${LOG}" && [ "$(state)" = READY ]; then
    echo "tpu_pod.sh: done (attempt $((attempt + 1)))" >&2
    exit 0
  fi
  if [ "${attempt}" -ge "${RETRIES}" ]; then
    echo "tpu_pod.sh: run failed (exit ${rc}) and no retries are left" >&2
    exit "$([ "${rc}" -ne 0 ] && echo "${rc}" || echo 1)"
  fi
  attempt=$((attempt + 1))
  echo "tpu_pod.sh: run ended with exit ${rc}; retry ${attempt} of ${RETRIES} once the slice is READY" >&2
  wait_ready
done
