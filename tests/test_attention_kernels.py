"""Pallas attention kernels (TPU splash, GPU flash; interpret mode on CPU) against the XLA path:
packed rows with several segments and padding, causal, grouped-query heads, outputs and
gradients; the kernel choice and interpret flag follow the mesh's devices; a sharded train step."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, PartitionSpec

from allava_jax.errors import UserError
from allava_jax.models import config as model_config
from allava_jax.models import kernels
from allava_jax.models.layers import Attention
from allava_jax.models.llava import Llava
from allava_jax.train import optim, step
from allava_jax.train.config import base_config
from allava_jax.train.sharding import DEFAULT_RULES, batch_sharding, batch_shards, make_mesh, replicated
from allava_jax.train.state import boxed_abstract_params, create_state, state_shardings, strip_boxes

L = 256
# Row 0: three segments (one crossing the 128-token tile boundary) then padding; row 1: short
# segments, one exactly filling the first tile, then padding.
SEGMENT_LENGTHS = ([60, 100, 70, 26], [128, 30, 40, 5, 53])


def packed_segments(lengths=SEGMENT_LENGTHS):
    rows = [np.concatenate([np.full(n, 0 if i == len(row) - 1 else i + 1) for i, n in enumerate(row)]) for row in lengths]
    return jnp.asarray(np.stack(rows), jnp.int32)


def xla_reference(q, k, v, segment_ids):
    """The XLA path of ``Attention`` (its causal, segment-masked blocks), for q/k/v tensors."""
    heads, kv_heads, head_dim = q.shape[2], k.shape[2], q.shape[3]
    module = Attention(heads, kv_heads, head_dim, q_block=128)
    return module._attend_causal_blocks(q, k, v, segment_ids)


def kernel(kind):
    return lambda q, k, v, seg: kernels.segment_attention(kind, q, k, v, seg, 1.0 / np.sqrt(q.shape[-1]), ("act_batch", "act_heads"))


def assert_close(actual, expected, err_msg=""):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=1e-5, err_msg=err_msg)


# Under a data=2 x tensor=4 mesh: one row and one q head per device; 2 kv heads do not split over
# 4 devices (the kernel's shard_map repeats them), 4 do.
@pytest.mark.parametrize("kind,heads,kv_heads,head_dim", [("splash", 4, 4, 32), ("splash", 4, 2, 64), ("flash", 4, 2, 32)])
@pytest.mark.parametrize("sharded", [False, True], ids=["one_device", "mesh"])
def test_kernel_equals_xla_attention_in_outputs_and_gradients(kind, heads, kv_heads, head_dim, sharded):
    rng = np.random.default_rng(heads + kv_heads)
    b = len(SEGMENT_LENGTHS)
    q = jnp.asarray(rng.normal(size=(b, L, heads, head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, L, kv_heads, head_dim)), jnp.float32) for _ in range(2))
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    segment_ids = packed_segments()

    @jax.jit
    def outputs_and_grads(q, k, v):
        results = {}
        for name, fn in (("xla", xla_reference), (kind, kernel(kind))):
            out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids), q, k, v)
            results[name] = (out, vjp(cotangent))
        return results

    if sharded:
        with jax.set_mesh(make_mesh({"data": 2, "fsdp": 1, "tensor": 4})), nn.logical_axis_rules(DEFAULT_RULES):
            results = outputs_and_grads(q, k, v)
    else:
        results = outputs_and_grads(q, k, v)
    (ref, ref_grads), (out, grads) = results["xla"], results[kind]
    assert_close(out, ref, "outputs")
    for name, got, want in zip("qkv", grads, ref_grads):
        assert got.shape == want.shape
        assert_close(got, want, f"d{name}")
    # Not vacuous: attention across the segment boundary would change row 0's second segment.
    leaky = xla_reference(q, k, v, jnp.ones_like(segment_ids))
    assert np.abs(np.asarray(leaky - out)[0, 60:160]).max() > 1e-2


def _abstract_mesh(platform):
    device = AbstractDevice(device_kind=f"fake {platform}", num_cores=1, platform=platform)
    return jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("data",), abstract_device=device))


def test_choice_and_interpret_follow_the_mesh_devices_not_the_host():
    assert kernels.resolve("auto") == "xla"  # CPU
    assert kernels.resolve("splash") == "splash" and kernels.resolve("flash") == "flash"  # interpreted on CPU
    with _abstract_mesh("tpu"):
        assert kernels.resolve("auto") == "splash" == kernels.resolve("auto", 256)
        assert kernels.resolve("auto", 200) == "xla"  # not whole tiles: auto falls back
        with pytest.raises(UserError, match="GPU kernel"):
            kernels.resolve("flash")
        # Built for TPU devices on this CPU host: the real Mosaic kernel, not the interpreter.
        q = jax.ShapeDtypeStruct((2, L, 4, 32), jnp.float32)
        seg = jax.ShapeDtypeStruct((2, L), jnp.int32)
        jaxpr = jax.make_jaxpr(kernel("splash"))(q, q, q, seg)
        assert _pallas_interpret_flags(jaxpr.jaxpr) == {False}
    with _abstract_mesh("gpu"):
        assert kernels.resolve("auto") == "flash" == kernels.resolve("auto", 2048)
        assert kernels.resolve("auto", 200) == "xla"
        with pytest.raises(UserError, match="TPU kernel"):
            kernels.resolve("splash")
        jaxpr = jax.make_jaxpr(kernel("flash"))(q, q, q, seg)  # built for GPUs: Triton, not the interpreter
        assert _pallas_interpret_flags(jaxpr.jaxpr) == {False}
    jaxpr = jax.make_jaxpr(kernel("splash"))(q, q, q, seg)
    assert _pallas_interpret_flags(jaxpr.jaxpr) == {True}
    with pytest.raises(UserError, match="attention="):
        model_config.tiny().replace(attention="fast")


def _pallas_interpret_flags(jaxpr):
    """The ``interpret`` params of every pallas_call in ``jaxpr`` and its sub-jaxprs."""
    flags = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            flags.add(bool(eqn.params["interpret"]))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            flags |= _pallas_interpret_flags(sub)
    return flags


def test_kernel_shards_only_the_dims_the_mesh_divides():
    mesh = AbstractMesh((2, 1, 4), ("data", "fsdp", "tensor"))
    spec = PartitionSpec(("data", "fsdp"), None, "tensor", None)
    assert kernels.fitted_spec(spec, (2, 256, 8, 32), mesh) == spec
    assert kernels.fitted_spec(spec, (1, 256, 6, 32), mesh) == PartitionSpec(None, None, None, None)


def test_sequence_length_not_a_multiple_of_128_is_a_clear_error():
    q = jnp.zeros((1, 200, 4, 32))
    with pytest.raises(UserError, match="multiple of 128; got 200"):
        kernel("splash")(q, q, q, jnp.ones((1, 200), jnp.int32))


def _packed_batch(conf, rows=8, length=128, seed=0):
    """Rows of 3 segments and a padding tail, an image at the start of each row's first one."""
    rng = np.random.default_rng(seed)
    n_img = conf.num_image_tokens
    tokens = rng.integers(0, conf.image_token_id, (rows, length)).astype(np.int32)
    tokens[:, :n_img] = conf.image_token_id
    segment_ids, positions = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(n_img + 8, length - 8), 3, replace=False))
        start = 0
        for s, end in enumerate(cuts):
            segment_ids[r, start:end], positions[r, start:end] = s + 1, np.arange(end - start)
            start = end
    loss_mask = (segment_ids > 0) & (rng.random((rows, length)) < 0.5)
    loss_mask[:, :n_img] = False
    size = conf.vision.image_size
    return {
        "tokens": tokens,
        "targets": rng.integers(0, conf.image_token_id, (rows, length)).astype(np.int32),
        "loss_mask": loss_mask,
        "segment_ids": segment_ids,
        "positions": positions,
        "images": rng.normal(size=(rows, 1, size, size, 3)).astype(np.float32),
        "image_mask": np.ones((rows, 1), bool),
    }


def test_sharded_train_step_with_splash_gives_the_xla_losses():
    """The tiny StableLM-2 model's train step (grouped-query heads) on a data x fsdp x tensor mesh,
    rows and heads sharded into the kernel's shard_map: two steps from the same state give the
    same losses and gradient norms with splash as with XLA. Both are fp32, the same math summed
    in another order (online softmax over 128-token tiles), so they differ by float32 rounding
    (~1e-7 relative per op), well inside 1e-5; the second step's loss checks the first update."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    param_rules = [("vision/.*", None), (".*", 1.0)]
    opt_cfg = base_config().optim
    opt_cfg.lr, opt_cfg.warmup_fraction = 1e-3, 0.0
    conf = model_config.tiny("stablelm")
    metrics = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        batches = [jax.device_put(_packed_batch(conf, seed=seed), batch_sharding(mesh)) for seed in (0, 1)]
        paths = [p for p in optim.flatten(strip_boxes(boxed_abstract_params(conf))) if optim.multiplier(p, param_rules) is not None]
        optimizer = optim.make_optimizer(opt_cfg, 10, paths, param_rules)
        abstract, shardings = state_shardings(conf, optimizer, param_rules, mesh, DEFAULT_RULES)
        initial = create_state(conf, optimizer, param_rules, shardings, abstract, seed=0)
        schedule = optim.schedule(opt_cfg.lr, opt_cfg.end_lr, 10, 0.0)
        for attention in ("xla", "splash"):
            model = Llava(conf.replace(attention=attention))
            train_step = step.make_train_step(model, optimizer, schedule, batch_shards=batch_shards(mesh))
            jitted = jax.jit(train_step, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, replicated(mesh)))
            traced = jitted.trace(initial, batches[0])
            assert _pallas_interpret_flags(traced.jaxpr.jaxpr) == ({True} if attention == "splash" else set())
            compiled = traced.lower().compile()
            state, metrics[attention] = initial, []
            for batch in batches:
                state, m = compiled(state, batch)
                metrics[attention].append(jax.device_get(m))
    for ref, got in zip(metrics["xla"], metrics["splash"]):
        for key in ("loss", "grad_norm", "accuracy"):
            np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, err_msg=key)
    assert metrics["xla"][0]["loss"] != metrics["xla"][1]["loss"]
