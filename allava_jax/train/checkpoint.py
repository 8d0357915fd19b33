"""Training checkpoints: params, optimizer state, data iterator state and configs, saved together.

One orbax ``CheckpointManager`` under ``WORKDIR/checkpoints`` (async, atomic; local or ``gs://``).
Permanent checkpoints land every ``checkpoint_every`` steps and at the last step, the newest
``keep`` of them kept; any other save (a time-based or a preemption checkpoint) is temporary:
kept only while it is the newest. Its
``params`` and ``model_config`` items are the format of ``allava_jax.checkpoints``, so
``generate``, ``serve``, ``convert export`` and the next stage's ``init_from`` read them directly.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import grain
import jax
import orbax.checkpoint as ocp

from allava_jax import storage
from allava_jax.checkpoints import MODEL_CONFIG, PARAMS
from allava_jax.models.config import LlavaConfig
from allava_jax.train.state import TrainState, merge

OPT_STATE, DATA, TRAIN_CONFIG, STEP = "opt_state", "data_iter", "train_config", "step"


# Orbax writes a replicated array in parts, one per replica ("replica-parallel"), and cuts each
# part out with a compiled slice: a checkpoint of many small leaves then spends its time compiling
# (the blocking part of one save of the tiny test model on 8 CPU devices: 15 s idle; on a loaded
# machine 41 s with it, 1.8 s without).
# Only leaves whose shards hold at least this many bytes are split, so large leaves keep
# parallel writes on pods.
REPLICA_PARALLEL_MIN_BYTES = 16 << 20


def _register_array_handler() -> None:
    # The default handler's ArrayMetadata store has no public name; keep it as the default has it.
    from orbax.checkpoint._src.metadata import array_metadata_store

    ocp.type_handlers.register_type_handler(
        jax.Array,
        ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES,
                                       array_metadata_store=array_metadata_store.Store()),
        override=True,
    )


@dataclasses.dataclass
class KeepPermanent:
    """Orbax preservation policy: the newest checkpoint, and the newest ``keep`` permanent ones
    (steps that are multiples of ``every``, and ``last_step``); ``keep`` 0 keeps every permanent one."""

    every: int
    keep: int
    last_step: int

    def is_permanent(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last_step

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        permanent = [c.step for c in checkpoints if self.is_permanent(c.step)]
        kept = set(permanent[-self.keep:] if self.keep > 0 else permanent)
        return [c.step in kept or i == len(checkpoints) - 1 for i, c in enumerate(checkpoints)]


def manager(workdir: Any, keep: int, every: int, last_step: int, async_save: bool = True) -> ocp.CheckpointManager:
    """The run's checkpoint manager; the loop decides when to save (orbax would also save a run's
    first step)."""
    _register_array_handler()
    options = ocp.CheckpointManagerOptions(
        preservation_policy=KeepPermanent(every, keep, last_step),
        enable_async_checkpointing=async_save,
        create=True,
    )
    directory = storage.as_path(workdir) / "checkpoints"
    if not storage.is_remote(directory):
        directory = directory.absolute()
    return ocp.CheckpointManager(directory, options=options, item_names=(PARAMS, OPT_STATE, DATA, MODEL_CONFIG, TRAIN_CONFIG))


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    state: TrainState,
    data_iter: grain.DatasetIterator,
    model_config: LlavaConfig,
    train_config: dict,
) -> bool:
    """Start an asynchronous save of everything a resume needs; returns whether one started."""
    args = ocp.args.Composite(
        **{
            PARAMS: ocp.args.StandardSave(merge(state.trainable, state.frozen)),
            OPT_STATE: ocp.args.StandardSave({STEP: state.step, "opt": state.opt_state}),
            DATA: grain.checkpoint.CheckpointSave(data_iter),
            MODEL_CONFIG: ocp.args.JsonSave(model_config.to_dict()),
            TRAIN_CONFIG: ocp.args.JsonSave(json.loads(json.dumps(train_config, default=str))),
        }
    )
    return mngr.save(step, args=args, force=True)


def restore(
    mngr: ocp.CheckpointManager, step: int, abstract: TrainState, data_iter: grain.DatasetIterator
) -> TrainState:
    """The state at ``step`` placed on its shardings; ``data_iter`` is moved to the saved position."""
    target_params = merge(abstract.trainable, abstract.frozen)
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            **{
                PARAMS: ocp.args.StandardRestore(target_params),
                OPT_STATE: ocp.args.StandardRestore({STEP: abstract.step, "opt": abstract.opt_state}),
                DATA: grain.checkpoint.CheckpointRestore(data_iter),
            }
        ),
    )
    params = restored[PARAMS]
    trainable = _select(params, abstract.trainable)
    frozen = _select(params, abstract.frozen)
    opt = restored[OPT_STATE]
    return TrainState(step=opt[STEP], trainable=trainable, frozen=frozen, opt_state=opt["opt"])


def _select(params: dict, like: dict) -> dict:
    """The sub-tree of ``params`` with the keys of ``like``."""
    if not isinstance(like, dict):
        return params
    return {k: _select(params[k], v) for k, v in like.items()}

