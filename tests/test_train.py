"""Trainer: recipe schedule, freezing, sharding invariance, accumulation, divergence."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_fixtures
from allava_jax import checkpoints
from allava_jax.models import config as model_config
from allava_jax.models.llava import Llava, init_params
from allava_jax.train import optim, step
from allava_jax.data.tokenizer import load_tokenizer
from allava_jax.train.config import base_config
from allava_jax.train.loop import TrainingDiverged, train
from allava_jax.train.loop import model_config as model_config_of  # `model_config` is models.config here
from allava_jax.train.metrics import read_jsonl


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return train_fixtures.demo_dir(tmp_path_factory)


def _losses(workdir):
    return np.asarray([row["loss"] for row in read_jsonl(workdir / "metrics.jsonl")])


def test_schedule_matches_the_recipe():
    total = 1000
    lr = optim.schedule(2e-5, 2e-6, total, 0.03)
    warmup = math.ceil(0.03 * total)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(warmup // 2)), 2e-5 * (warmup // 2) / warmup, rtol=1e-6)
    np.testing.assert_allclose(float(lr(warmup)), 2e-5, rtol=1e-6)
    mid = warmup + (total - warmup) // 2
    np.testing.assert_allclose(float(lr(mid)), 2e-6 + (2e-5 - 2e-6) * 0.5, rtol=1e-4)  # cosine halfway
    np.testing.assert_allclose(float(lr(total)), 2e-6, rtol=1e-6)
    assert all(float(lr(s)) >= float(lr(s + 1)) for s in range(warmup, total))


# Per row (batch_shards=2, L=16, logits_fraction 0.5): budgets 1..8 slots; 5 loss positions take
# a 5-slot gather, 14 exceed 8 and take the full head. Both rows as one group (batch_shards=1):
# budgets 2, 4, ..., 16; 5 + 3 loss positions take 8 slots, 14 + 3 take the full head.
# logits_chunk 3: the head scores 3 positions at a time (16 and the 8-slot budget padded to a multiple).
@pytest.mark.parametrize(
    "answer_len,batch_shards,dtype,chunk",
    [(5, 1, "float32", 0), (5, 2, "float32", 0), (14, 2, "float32", 0), (5, 1, "bfloat16", 0), (5, 1, "float32", 3),
     (14, 2, "float32", 3)],
)
def test_loss_on_gathered_positions_equals_the_full_head(answer_len, batch_shards, dtype, chunk):
    conf = model_config.tiny().replace(dtype=dtype)
    params = init_params(conf, jax.random.key(0))
    rng = np.random.default_rng(0)
    n, length = 2, 16
    tokens = rng.integers(0, conf.image_token_id, (n, length)).astype(np.int32)
    tokens[:, :4] = conf.image_token_id  # one image (4 placeholder tokens at 28 px) per row
    mask = np.zeros((n, length), bool)
    mask[0, 15 - answer_len : 15] = True
    mask[1, [5, 9, 11]] = True
    batch = {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "loss_mask": mask,
        "segment_ids": np.ones((n, length), np.int32),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (n, length)),
        "images": rng.normal(size=(n, 1, 28, 28, 3)).astype(np.float32),
        "image_mask": np.ones((n, 1), bool),
    }

    def loss(p, b, fraction, chunk=0):  # the batch is an argument: cases of one shape share programs
        total, correct = step.loss_terms(Llava(conf), p, b, fraction, batch_shards, chunk)
        return total, correct

    idx, valid = step.loss_positions(mask, 6)
    assert idx[1, :3].tolist() == [5, 9, 11] and valid.sum(axis=1).tolist() == [min(answer_len, 6), 3]
    loss_and_grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(2, 3))
    (full, full_correct), full_grads = loss_and_grads(params, batch, 0.0)
    # gathered positions (and chunked, when the case says so); every position chunked
    for fraction in (0.5, 0.0) if chunk else (0.5,):
        (part, part_correct), part_grads = loss_and_grads(params, batch, fraction, chunk)
        exact = dtype == "float32"  # bfloat16: the same math, rounded at different points
        np.testing.assert_allclose(part, full, rtol=1e-6 if exact else 1e-2)
        assert int(part_correct) == int(full_correct) or not exact
        for a, b in zip(jax.tree.leaves(part_grads), jax.tree.leaves(full_grads)):
            assert a.dtype == b.dtype
            np.testing.assert_allclose(a, b, rtol=1e-5 if exact else 5e-2, atol=2e-6 if exact else 2e-3)


def test_param_rules_freeze_and_scale():
    rules = [("vision/.*", None), ("projector/.*", 2.0), (".*", 1.0)]
    assert optim.multiplier("vision/layers/mlp/fc1/kernel", rules) is None
    assert optim.multiplier("projector/linear_1/bias", rules) == 2.0
    with pytest.raises(ValueError, match="no param rule matches"):
        optim.multiplier("llm/x", [("vision/.*", None)])


def test_learning_rate_groups_scale_the_updates_of_their_params():
    """Two multipliers: AdamW's first update is ~lr per element, so the 3.0 group's moves 3x as far."""
    cfg = base_config().optim
    cfg.lr, cfg.warmup_fraction, cfg.clip_norm = 1e-2, 0.0, 0.0
    params = {"vision": {"w": jnp.ones((2, 3))}, "llm": {"layers": {"w": jnp.ones((3,))}}}
    rules = [("vision/.*", 3.0), (".*", 1.0)]
    opt = optim.make_optimizer(cfg, 10, list(optim.flatten(params)), rules)
    grads = jax.tree.map(lambda x: 0.5 * jnp.ones_like(x), params)
    updates, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_allclose(updates["llm"]["layers"]["w"], -1e-2, rtol=1e-4)
    np.testing.assert_allclose(updates["vision"]["w"], -3e-2, rtol=1e-4)


def test_mesh_shapes_give_the_same_losses_and_frozen_params_stay_bit_identical(data_dir, tmp_path):
    base = dict(total_steps=20, checkpoint_every=20)
    ref = train(train_fixtures.config(data_dir, num_devices=1, **base), tmp_path / "one")
    assert ref["step"] == 20
    one = _losses(tmp_path / "one")
    assert len(one) == 20 and one[-1] < one[0]
    fsdp4_tensor2, data2_fsdp4 = {"data": 1, "fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 4, "tensor": 1}
    runs = {
        "fsdp4_tensor2": {"mesh": fsdp4_tensor2},
        # Unrolled layers (the CPU setting) over the same stacked, sharded params; data parallel
        # with the scan is the gradient-accumulation test's mesh.
        "data2_fsdp4_unrolled": {"mesh": data2_fsdp4, "model_overrides.scan_layers": False},
    }
    for name, overrides in runs.items():
        train(train_fixtures.config(data_dir, **overrides, **base), tmp_path / name)
        np.testing.assert_allclose(_losses(tmp_path / name), one, rtol=1e-5, atol=0, err_msg=name)

    # Frozen vision params: bit-identical to the initial ones (same seed, same init).
    trained = checkpoints.load_params(tmp_path / "one")
    assert set(trained) == {"vision", "projector", "llm"}
    first = _first_params(data_dir)
    jax.tree.map(np.testing.assert_array_equal, trained["vision"], first["vision"])
    assert not np.array_equal(trained["llm"]["lm_head"]["kernel"], first["llm"]["lm_head"]["kernel"])


def _first_params(data_dir):
    """The params a run starts from: the model's own init at the run's seed."""
    cfg = train_fixtures.config(data_dir)
    return init_params(model_config_of(cfg, load_tokenizer(cfg.tokenizer)), jax.random.key(cfg.seed))


def test_gradient_accumulation_gives_the_same_losses(data_dir, tmp_path):
    base = dict(total_steps=6, num_devices=2, checkpoint_every=6)
    train(train_fixtures.config(data_dir, **base), tmp_path / "full")
    train(train_fixtures.config(data_dir, micro_batch_size=2, **base), tmp_path / "accum")
    np.testing.assert_allclose(_losses(tmp_path / "accum"), _losses(tmp_path / "full"), rtol=1e-5)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    cfg = train_fixtures.config(data_dir, num_devices=1, total_steps=10, checkpoint_every=1)
    cfg.optim.lr = 1e38  # step 1 has lr 0 (warmup); step 2's update overflows
    cfg.optim.clip_norm = 0.0
    with pytest.raises(TrainingDiverged, match="step 2: .*not finite"):
        train(cfg, tmp_path / "nan")
    assert checkpoints.resolve(tmp_path / "nan")[1] == 1
    params = checkpoints.load_params(tmp_path / "nan")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_training_on_an_offline_plan_with_held_out_eval(data_dir, tmp_path):
    """`data.packing="offline"` trains on a plan's rows (longer than data.seq_len), and the
    held-out eval, which has no plan, packs its sources online."""
    from allava_jax.data import demo
    from allava_jax.data.__main__ import main as data_main
    from allava_jax.train.config import base_config

    locked = base_config()
    locked.lock()
    locked.data.plan = "p.plan"  # what --config.data.plan=... does on a locked config
    cfg = train_fixtures.config(data_dir, num_devices=2, total_steps=2, checkpoint_every=2)
    srcs = list(cfg.data.sources)
    plan = str(tmp_path / "p.plan")
    argv = ["plan", "--tokenizer", cfg.tokenizer, "--seq-len", str(cfg.data.seq_len), "--row-len", "256",
            "--num-image-tokens", str(model_config.get_preset("tiny").num_image_tokens),
            "--max-images", str(cfg.data.max_images_per_row), "--out", plan]
    for s in srcs:
        argv += ["--data", json.dumps(s)]
    assert data_main(argv) == 0
    cfg.data.packing, cfg.data.plan = "offline", plan
    cfg.eval.sources, cfg.eval.every, cfg.eval.batches, cfg.eval.batch_size = (demo.sources(data_dir, 2)[0],), 2, 2, 4
    summary = train(cfg, tmp_path / "run")
    assert summary["step"] == 2 and np.isfinite(summary["eval_loss"]) and summary["eval_accuracy"] >= 0
    assert summary["data"]["samples"] > 0 and summary["data"]["skipped_total"] == 0
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval_loss" in r] == [2]
