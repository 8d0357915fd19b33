"""Learning-rate schedule, freezing / per-part learning rates by regex, and the optimizer.

Param rules are ``(regex, multiplier)`` pairs over ``/``-joined param paths, first match wins;
``None`` freezes. Frozen params are split off before differentiation, so they get no gradient
and no optimizer state at all.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import optax
from flax import traverse_util

from allava_jax.errors import UserError

Rules = Sequence[tuple[str, float | None]]


def flatten(params: Mapping) -> dict[str, Any]:
    return traverse_util.flatten_dict(params, sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def multiplier(path: str, rules: Rules) -> float | None:
    for pattern, mult in rules:
        if re.fullmatch(pattern, path):
            return mult
    raise UserError(f"no param rule matches {path!r}; end the rules with ('.*', 1.0)")


def split_trainable(params: Mapping, rules: Rules) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainable, frozen) flat dicts keyed by '/'-joined paths."""
    trainable, frozen = {}, {}
    for path, value in flatten(params).items():
        (frozen if multiplier(path, rules) is None else trainable)[path] = value
    return trainable, frozen


def schedule(
    peak_lr: float, end_lr: float, total_steps: int, warmup_fraction: float
) -> optax.Schedule:
    """Linear warmup from 0 over ``ceil(warmup_fraction * total)`` steps, then cosine to ``end_lr``
    at ``total_steps`` (the paper: 3 % warmup, 2e-5 -> 2e-6)."""
    warmup = max(1, math.ceil(warmup_fraction * total_steps)) if warmup_fraction > 0 else 0
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=end_lr,
    )


def make_optimizer(cfg: Any, total_steps: int, trainable_paths: Sequence[str], rules: Rules) -> optax.GradientTransformation:
    """Clipping, then AdamW per learning-rate group (one group per distinct multiplier)."""
    lr = schedule(cfg.lr, cfg.end_lr, total_steps, cfg.warmup_fraction)

    def adamw(mult: float) -> optax.GradientTransformation:
        scaled = lr if mult == 1.0 else (lambda step: mult * lr(step))
        return optax.adamw(scaled, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)

    labels = {path: str(multiplier(path, rules)) for path in trainable_paths}
    groups = {label: adamw(float(label)) for label in set(labels.values())}
    # multi_transform wants the labels as a tree shaped like the (nested) params, not flat paths.
    inner = groups[next(iter(groups))] if len(groups) == 1 else optax.multi_transform(
        groups, lambda params: unflatten({path: labels[path] for path in flatten(params)}))
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    return optax.chain(*parts, inner)
