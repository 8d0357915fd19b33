#!/usr/bin/env bash
# One host, all its accelerators (or CPU): the two ALLaVA stages back to back.
#   DATA=/data/allava INIT=ckpt/phi2_clip336 bash launch/single_host.sh [extra --config.* flags]
# Rerunning the same command resumes each stage from its latest checkpoint.
set -euo pipefail
DATA=${DATA:?set DATA to the directory holding the ALLaVA files}
INIT=${INIT:?set INIT to a 'python -m allava_jax.convert import' checkpoint}
RUNS=${RUNS:-runs}
python -m allava_jax.train --config "configs/allava_stage1.py:${DATA}" --workdir "${RUNS}/stage1" \
  --config.init_from="${INIT}" "$@"
python -m allava_jax.train --config "configs/allava_stage2.py:${DATA}" --workdir "${RUNS}/stage2" \
  --config.init_from="${RUNS}/stage1" "$@"
