"""The masked next-token loss and the jitted train / eval steps (with gradient accumulation)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from allava_jax.models import Llava
from allava_jax.models.rice import PACK_KEYS
from allava_jax.train.state import TrainState, merge

Batch = dict[str, jax.Array]


def vision_inputs(batch: Batch) -> jax.Array | Batch:
    """What the vision tower takes: ``images``, or a native-resolution batch's packed patch
    sequence (``models.rice.PACK_KEYS``)."""
    if "patches" in batch:
        return {k: batch[k] for k in PACK_KEYS if k in batch}  # kv_windows: inference only
    return batch["images"]


def hidden_states(model: Llava, params: dict, batch: Batch) -> jax.Array:
    return model.apply(
        {"params": params},
        batch["tokens"],
        vision_inputs(batch),
        batch.get("image_mask"),
        batch["segment_ids"],
        batch["positions"],
        method=Llava.hidden,
    )


def logits_at(model: Llava, params: dict, hidden: jax.Array) -> jax.Array:
    return model.apply({"params": params}, hidden, method=Llava.head)


def cross_entropy_terms(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed cross-entropy over masked positions, number of correct argmax predictions).

    A prediction is correct when the target's logit is the row maximum: the same as ``argmax ==
    target`` except for exact ties, and a plain max-reduce (which XLA shares with the cross
    entropy's) instead of a variadic argmax-reduce over the vocabulary, which costs ~7 % of a CPU
    train step at vocab 51200.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (target_logit >= jnp.max(logits, axis=-1)) & mask
    return jnp.sum(jnp.where(mask, ce, 0.0)), jnp.sum(correct)


def head_cross_entropy(
    model: Llava, hp: dict, hidden: jax.Array, targets: jax.Array, mask: jax.Array, chunk: int = 0
) -> tuple[jax.Array, jax.Array]:
    """``cross_entropy_terms`` of the LM head's logits at every position of ``hidden`` [R, T, D].

    With ``chunk`` > 0 the head runs ``chunk`` positions at a time in a scan whose body is
    rematerialised: only one [R, chunk, vocab] block of float32 logits (and its gradient) exists at
    once instead of [R, T, vocab]. At Qwen3's 151936-word vocabulary one 8192-token row's logits
    are 4.6 GiB, twice that with their gradient: more than a v5e chip has left beside the model.
    The sums are the same up to float summation order.
    """
    length = hidden.shape[1]
    if not chunk or length <= chunk:
        return cross_entropy_terms(logits_at(model, hp, hidden), targets, mask)
    n = -(-length // chunk)
    pad = n * chunk - length
    if pad:  # padded positions carry no loss
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, mask = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))

    def blocks(x: jax.Array) -> jax.Array:  # [R, n * chunk, ...] -> [n, R, chunk, ...]
        return jnp.moveaxis(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def block(carry: tuple[jax.Array, jax.Array], xs: tuple[jax.Array, ...]) -> tuple[tuple[jax.Array, jax.Array], None]:
        h, t, m = xs
        total, correct = cross_entropy_terms(logits_at(model, hp, h), t, m)
        return (carry[0] + total, carry[1] + correct), None

    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    (total, correct), _ = jax.lax.scan(block, init, (blocks(hidden), blocks(targets), blocks(mask)))
    return total, correct


def loss_positions(loss_mask: jax.Array, budget: int) -> tuple[jax.Array, jax.Array]:
    """Each row's first ``budget`` loss positions [B, budget] (in order, padded with 0) and which
    of them are real [B, budget]."""
    idx = jax.vmap(lambda m: jnp.nonzero(m, size=budget, fill_value=0)[0])(loss_mask)
    valid = jnp.arange(budget)[None, :] < jnp.sum(loss_mask, axis=1, keepdims=True)
    return idx.astype(jnp.int32), valid


LOGITS_BUCKETS = 16  # gathered-head sizes are multiples of (group length) / LOGITS_BUCKETS


def head_params(model: Llava, params: dict) -> dict:
    """The params ``Llava.head`` reads: final LayerNorm, LM head (or the tied embedding), head bias."""
    names = ["final_layernorm", "lm_head", "lm_head_bias"]
    if model.config.text.tie_word_embeddings:
        names.append("embed_tokens")
    return {"llm": {name: params["llm"][name] for name in names if name in params["llm"]}}


def loss_terms(
    model: Llava, params: dict, batch: Batch, logits_fraction: float = 0.0, batch_shards: int = 1, logits_chunk: int = 0
) -> tuple[jax.Array, jax.Array]:
    """Summed masked next-token cross-entropy and correct count for a packed batch.

    With ``logits_fraction`` in (0, 1) the LM head runs on loss positions only: only answer tokens
    carry a loss, and the logits of the other positions (image tokens, prompts) would be most of a
    small model's step and a [B, L, vocab] buffer. The rows each of the ``batch_shards`` devices
    holds are taken as one group (a reshape that stays on the device), and each group's loss
    positions are gathered into the smallest of the budgets G/16, 2G/16, ... (up to
    ``logits_fraction * G``, G = the group's token slots) that holds every group's. A batch with
    a group of more loss positions takes the full head (the same result, only slower), so no
    target is ever dropped. ``logits_chunk``: see ``head_cross_entropy``.
    """
    hidden = hidden_states(model, params, batch)
    targets, mask = batch["targets"], batch["loss_mask"]

    def full(hp: dict, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        return head_cross_entropy(model, hp, h, targets, mask, logits_chunk)

    rows, length = mask.shape
    group_rows = rows // batch_shards if batch_shards and rows % batch_shards == 0 else 1
    group_len = group_rows * length
    bucket = max(group_len // LOGITS_BUCKETS, 1)
    budgets = [b for b in range(bucket, int(group_len * logits_fraction) + 1, bucket) if b < group_len]
    if not budgets:
        return full(params, hidden)
    grouped_mask = mask.reshape(-1, group_len)
    grouped_targets = targets.reshape(-1, group_len)

    def gathered(budget: int) -> Callable[[dict, jax.Array], tuple[jax.Array, jax.Array]]:
        def branch(hp: dict, h: jax.Array) -> tuple[jax.Array, jax.Array]:
            idx, valid = loss_positions(grouped_mask, budget)
            scored = jnp.take_along_axis(h.reshape(-1, group_len, h.shape[-1]), idx[..., None], axis=1)
            return head_cross_entropy(model, hp, scored, jnp.take_along_axis(grouped_targets, idx, axis=1), valid,
                                      logits_chunk)

        return branch

    most = jnp.max(jnp.sum(grouped_mask, axis=1))
    index = jnp.sum(most > jnp.asarray(budgets))  # the first budget that fits; len(budgets) = full
    return switched_head_loss([gathered(b) for b in budgets] + [full], index, head_params(model, params), hidden)


def switched_head_loss(
    branches: list[Callable[[dict, jax.Array], tuple[jax.Array, jax.Array]]], index: jax.Array, hp: dict, hidden: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``lax.switch(index, branches, hp, hidden)`` whose gradient each branch computes itself.

    Differentiating a plain ``lax.switch`` makes every branch emit the residuals of all branches
    (zeros for the others): here vocab-sized logits per budget, 1.9 GiB more temporaries per device
    in the full-size step. Each branch returns its loss's gradients instead; the backward pass only
    scales them.
    """

    @jax.custom_vjp
    def run(hp: dict, hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jax.lax.switch(index, branches, hp, hidden)

    def with_grads(branch: Callable) -> Callable:
        return lambda hp, h: jax.value_and_grad(branch, argnums=(0, 1), has_aux=True)(hp, h)

    def fwd(hp: dict, hidden: jax.Array) -> tuple[tuple[jax.Array, jax.Array], tuple[dict, jax.Array]]:
        return jax.lax.switch(index, [with_grads(b) for b in branches], hp, hidden)

    def bwd(grads: tuple[dict, jax.Array], cotangents: tuple[jax.Array, Any]) -> tuple[dict, jax.Array]:
        scale = cotangents[0]
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)

    run.defvjp(fwd, bwd)
    return run(hp, hidden)


def _micro_batches(batch: Batch, accum: int) -> Batch:
    """[B, ...] -> [accum, B / accum, ...], micro-batch k = rows k, k + accum, ... so that each
    device's contiguous rows stay on that device."""

    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % accum:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {accum} micro-batches")
        return jnp.moveaxis(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 1, 0)

    return jax.tree.map(split, batch)


def make_train_step(
    model: Llava,
    optimizer: optax.GradientTransformation,
    schedule: Callable,
    accum_steps: int = 1,
    logits_fraction: float = 0.0,
    batch_shards: int = 1,
    logits_chunk: int = 0,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Loss normalised per target token over the whole global batch, whatever ``accum_steps``;
    ``logits_fraction``, ``batch_shards`` (devices the batch is split over), ``logits_chunk``: see
    ``loss_terms``."""

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        n_targets = jnp.maximum(jnp.sum(batch["loss_mask"]), 1).astype(jnp.float32)

        def loss_fn(trainable: dict, micro: Batch) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            total, correct = loss_terms(model, merge(trainable, state.frozen), micro, logits_fraction, batch_shards,
                                        logits_chunk)
            return total / n_targets, (total, correct)

        grad_fn = jax.grad(loss_fn, has_aux=True)
        if accum_steps == 1:
            grads, (total, correct) = grad_fn(state.trainable, batch)
        else:

            def body(carry, micro):
                g_acc, t_acc, c_acc = carry
                g, (t, c) = grad_fn(state.trainable, micro)
                return (jax.tree.map(jnp.add, g_acc, g), t_acc + t, c_acc + c), None

            zeros = jax.tree.map(jnp.zeros_like, state.trainable)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
            (grads, total, correct), _ = jax.lax.scan(body, init, _micro_batches(batch, accum_steps))

        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        # An overflowing update makes the next params non-finite even when the loss was finite.
        update_norm = optax.global_norm(updates)
        metrics = {
            "loss": total / n_targets,
            "accuracy": correct / n_targets,
            "grad_norm": grad_norm,
            "update_norm": update_norm,
            "lr": schedule(state.step),
            "target_tokens": n_targets,
            "real_tokens": jnp.sum(batch["segment_ids"] > 0),
        }
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        return new_state, metrics

    return step


def make_eval_step(
    model: Llava, logits_fraction: float = 0.0, batch_shards: int = 1, logits_chunk: int = 0
) -> Callable[[dict, Batch], dict[str, jax.Array]]:
    """Summed loss / correct / target counts for one held-out batch (the caller averages)."""

    def step(params: dict, batch: Batch) -> dict[str, jax.Array]:
        total, correct = loss_terms(model, params, batch, logits_fraction, batch_shards, logits_chunk)
        return {"loss_sum": total, "correct": correct, "targets": jnp.sum(batch["loss_mask"])}

    return step


def lower_train_step(step_fn: Callable, abstract_state: TrainState, abstract_batch: Any, shardings: TrainState, batch_sharding) -> Any:
    """``jit(...).lower`` with explicit shardings, for compile-only analysis (no weights allocated)."""
    jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None), donate_argnums=0)
    return jitted.lower(abstract_state, abstract_batch)
