"""Train state and its shape-first, sharded creation.

``jax.eval_shape`` gives every array's shape and logical axes; the rules turn those into
shardings; pretrained weights are restored straight into their shards, or ``jit`` initialises
them already sharded. No full copy of the model ever lives on one device.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from allava_jax import checkpoints
from allava_jax.models import Llava, example_inputs
from allava_jax.models.config import LlavaConfig
from allava_jax.train import optim
from allava_jax.train.sharding import logical_shardings, replicated


@struct.dataclass
class TrainState:
    step: jax.Array
    trainable: dict  # nested, the params the rules train
    frozen: dict  # nested, the params the rules freeze (no gradient, no optimizer state)
    opt_state: Any

    @property
    def params(self) -> dict:
        return merge(self.trainable, self.frozen)


def merge(a: dict, b: dict) -> dict:
    return optim.unflatten({**optim.flatten(a), **optim.flatten(b)})


def split(params: dict, rules: optim.Rules) -> tuple[dict, dict]:
    trainable, frozen = optim.split_trainable(params, rules)
    return optim.unflatten(trainable), optim.unflatten(frozen)


def strip_boxes(tree: Any) -> Any:
    """``nn.Partitioned`` boxes -> their values, without the sharding constraint that
    ``nn.unbox`` applies (invalid on abstract values outside ``jit``)."""
    return jax.tree.map(
        lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )


def boxed_abstract_params(config: LlavaConfig) -> dict:
    """Abstract params with their ``nn.Partitioned`` logical axes."""
    return jax.eval_shape(lambda: Llava(config).init(jax.random.key(0), **example_inputs(config))["params"])


def state_shardings(
    config: LlavaConfig, optimizer: optax.GradientTransformation, rules: optim.Rules, mesh: Mesh, axis_rules
) -> tuple[TrainState, TrainState]:
    """(abstract state, shardings), both as ``TrainState`` trees."""
    boxed = boxed_abstract_params(config)
    trainable_boxed, frozen_boxed = split(boxed, rules)
    opt_boxed = jax.eval_shape(optimizer.init, trainable_boxed)
    shardings = TrainState(
        step=replicated(mesh),
        trainable=logical_shardings(trainable_boxed, mesh, axis_rules),
        frozen=logical_shardings(frozen_boxed, mesh, axis_rules),
        opt_state=logical_shardings(opt_boxed, mesh, axis_rules),
    )
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        trainable=strip_boxes(trainable_boxed),
        frozen=strip_boxes(frozen_boxed),
        opt_state=strip_boxes(opt_boxed),
    )
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return abstract, shardings


def create_state(
    config: LlavaConfig,
    optimizer: optax.GradientTransformation,
    rules: optim.Rules,
    shardings: TrainState,
    abstract: TrainState,
    *,
    seed: int,
    init_from: str | None = None,
) -> TrainState:
    """Random init, or params from a checkpoint restored straight into their shards."""
    if init_from:
        target = merge(abstract.trainable, abstract.frozen)
        params = checkpoints.load_params(init_from, target)
        trainable, frozen = split(params, rules)
        make: Callable = lambda t, f: TrainState(jnp.zeros((), jnp.int32), t, f, optimizer.init(t))  # noqa: E731
        return jax.jit(make, out_shardings=shardings, donate_argnums=(0, 1))(trainable, frozen)

    def init(key: jax.Array) -> TrainState:
        params = nn.unbox(Llava(config).init(key, **example_inputs(config))["params"])
        trainable, frozen = split(params, rules)
        return TrainState(jnp.zeros((), jnp.int32), trainable, frozen, optimizer.init(trainable))

    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
