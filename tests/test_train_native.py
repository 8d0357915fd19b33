"""Training at native resolution (LLaVA-OneVision-1.5): packed rows of several images of different
sizes through the grain pipeline give the loss and gradients of the same samples run one per row,
where each reference row is built independently (inference's float processing, ``pack_images``
on that sample's images alone); both packing budgets hold; bad images are counted skips."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ov15_fixtures as F
from allava_jax.data import native, pipeline, sources
from allava_jax.models import Llava, get_preset, init_params
from allava_jax.models import rice
from allava_jax.train import flops as flops_lib
from allava_jax.train.step import loss_terms
from data_fixtures import image_bytes

PIXELS = dict(min_pixels=28 * 28, max_pixels=112 * 112)  # tiny_ov15's budget: grids 2x2 .. 8x8
SPEC = native.NativeSpec(**PIXELS)
# (W, H) of each record's images: grids 2x4, 6x8, 4x4, 2x2 + 8x4, 8x8, none (text only).
RECORD_IMAGES = (((60, 40),), ((100, 90),), ((56, 56),), ((28, 28), (120, 56)), ((112, 112),), ())


def _write(root, records_images=RECORD_IMAGES, bad=()):
    """An ALLaVA-layout JSON whose records have these images; ``bad``: (name, bytes) records."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    records = []
    for i, sizes in enumerate(records_images):
        names = []
        for j, (w, h) in enumerate(sizes):
            name = f"images/{i}_{j}.png"
            with open(os.path.join(root, name), "wb") as f:
                f.write(image_bytes(w, h, fmt="PNG", seed=10 * i + j))
            names.append(name)
        question = "".join("<image>\n" for _ in names) + f"what is {'this ' * (i + 1)}?"
        rec = {"id": f"r{i}", "conversations": [{"from": "human", "value": question},
                                                 {"from": "gpt", "value": "a cat is red . " * (1 + i % 3)}]}
        if names:
            rec["image"] = names if len(names) > 1 else names[0]
        records.append(rec)
    for name, data in bad:
        with open(os.path.join(root, f"images/{name}"), "wb") as f:
            f.write(data)
        records.append({"id": name, "image": f"images/{name}", "conversations": [
            {"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "red ."}]})
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path, records


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = F.qwen_tokenizer()
    root = str(tmp_path_factory.mktemp("native"))
    path, records = _write(root)
    config = get_preset("tiny_ov15").replace(
        text={"vocab_size": max(len(tok), 128)}, image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        dtype="float32")
    return tok, root, path, records, config


def _kw(setup, tmp_path, **over):
    tok, root, path, _, config = setup
    kw = dict(sources_cfg=[{"name": "n", "path": path, "image_root": root}], tokenizer=tok, seq_len=512,
              batch_size=1, image_token_id=config.image_token_id, num_image_tokens=0, max_images_per_row=4,
              native=SPEC, max_patches_per_row=256, num_epochs=1, keep_meta=True, cache_dir=str(tmp_path),
              chat_template="qwen2vl", num_packing_bins=1, max_bad_fraction=1.0)
    kw.update(over)
    return kw


def _reference_row(example, record, root, seq_len, n_patches, n_cls):
    """One sample alone in a row: its tokens, and its images processed as inference does
    (``native.load_native``, float32) and packed on their own."""
    names = record.get("image", [])
    names = [names] if isinstance(names, str) else names
    imgs = [native.load_native(open(os.path.join(root, n), "rb").read(), **PIXELS) for n in names]
    t = len(example["tokens"])
    row = {"tokens": np.zeros(seq_len, np.int32), "targets": np.zeros(seq_len, np.int32),
           "loss_mask": np.zeros(seq_len, bool), "segment_ids": np.zeros(seq_len, np.int32),
           "positions": np.zeros(seq_len, np.int32)}
    row["tokens"][:t], row["targets"][:t], row["loss_mask"][:t] = example["tokens"], example["targets"], example["loss_mask"]
    row["segment_ids"][:t], row["positions"][:t] = 1, np.arange(t)
    pack = rice.pack_images([[(im.patches, im.grid) for im in imgs]], rice.Buckets(patch_multiple=n_patches, max_images=n_cls))
    row.update({k: v[0] for k, v in pack.items()})
    row["image_mask"] = np.arange(n_cls) < len(imgs)
    return row


def _loss_and_grads(model, params, batch, n_targets):
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "sample"}
    fn = jax.jit(jax.value_and_grad(lambda p: loss_terms(model, p, batch)[0] / n_targets))
    return fn(params)


def _packed_rows(setup, tmp_path, **over):
    it = pipeline.make_pipeline(**_kw(setup, tmp_path, **over))
    rows = list(it)
    return rows, it.stats()


@pytest.mark.parametrize("attention", ["xla", "splash", "flash"])
def test_packed_row_of_several_images_matches_one_sample_per_row(setup, tmp_path, attention):
    tok, root, path, records, config = setup
    seq_len, max_patches, max_images = (512, 256, 4) if attention == "xla" else (384, 252, 4)  # kernels: 128-multiples
    rows, stats = _packed_rows(setup, tmp_path, seq_len=seq_len, max_patches_per_row=max_patches)
    assert stats["samples"] == len(records) and stats["skipped_total"] == 0
    # Several images of different sizes share a row.
    assert max(len(np.unique(r["patch_segments"][r["patch_segments"] > 0])) for r in rows) >= 3
    for r in rows:
        assert set(r) == set(pipeline.NATIVE_BATCH_KEYS) | {"sample"}
        assert r["patches"].shape == (1, max_patches, 588) and r["cls_segments"].shape == (1, max_images)
        # Placeholders per image = its patches / 4, in order.
        n_img = int(r["image_mask"].sum())
        per_image = np.bincount(r["patch_segments"][0], minlength=n_img + 1)[1:]
        assert (r["tokens"] == config.image_token_id).sum() == per_image.sum() // 4
    config = config.replace(attention=attention)
    model = Llava(config)
    params = init_params(config, jax.random.key(0))
    n_targets = float(sum(r["loss_mask"].sum() for r in rows))

    packed = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}  # one step over all packed rows
    packed_loss, packed_grads = _loss_and_grads(model, params, packed, n_targets)
    packed_loss = float(packed_loss)

    # The reference: every sample alone in its row, images processed independently.
    builder = pipeline.example_builder(
        sources.parse_sources([{"name": "n", "path": path, "image_root": root}], "qwen2vl"),
        tok, seq_len=seq_len, num_image_tokens=0, image_token_id=config.image_token_id, max_images_per_sample=4,
        native=SPEC)
    ref_rows = []
    for i, rec in enumerate(records):
        example = builder.map({"source": 0, "index": i, "record": json.dumps(rec)})
        ref_rows.append(_reference_row(example, rec, root, seq_len, max_patches, max_images))
    ref = {k: np.stack([r[k] for r in ref_rows]) for k in ref_rows[0]}
    assert float(ref["loss_mask"].sum()) == n_targets
    ref_loss, ref_grads = _loss_and_grads(model, params, ref, n_targets)

    print(f"\n{attention}: {len(rows)} packed rows, {len(ref_rows)} samples; loss {packed_loss:.8f} vs {float(ref_loss):.8f}")
    assert abs(packed_loss - float(ref_loss)) < 1e-5, (packed_loss, float(ref_loss))
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), packed_grads, ref_grads))
    print(f"max |grad diff| {max(diffs):.2e}")
    assert max(diffs) < 1e-5, max(diffs)
    # Every part of the model got a gradient (the vision tower too): the comparison is not vacuous.
    assert float(jnp.max(jnp.abs(packed_grads["vision"]["patch_embedding"]))) > 1e-6


def test_rows_respect_both_budgets_and_bad_images_are_counted_skips(setup, tmp_path):
    tok, _, _, _, config = setup
    root = str(tmp_path / "data")
    bad = (("wide.png", image_bytes(3000, 14, fmt="PNG")), ("corrupt.png", b"\x89PNG\r\n\x1a\n not an image"))
    path, records = _write(root, bad=bad)
    rows, stats = _packed_rows(setup, tmp_path, sources_cfg=[{"name": "n", "path": path, "image_root": root}],
                               seq_len=128, max_patches_per_row=48)
    # The 8x8 image (64 patches) cannot fit 48; the 3000x14 one exceeds aspect 200; one is corrupt.
    assert {k: v for k, v in stats["skipped"].items() if v} == {"too_many_patches": 1, "image_aspect_ratio": 1, "corrupt_image": 1}
    assert stats["samples"] == len(records) - 3
    for r in rows:
        assert r["patches"].shape[1] == 48 and (r["patch_segments"] > 0).sum() <= 48
        assert (r["segment_ids"] > 0).sum() <= 128
    # The patch budget binds: the rows' patches would not fit in fewer rows of 48.
    total = sum(int((r["patch_segments"] > 0).sum()) for r in rows)
    assert len(rows) >= -(-total // 48) and len(rows) > 1


def test_native_flops_count_each_image_by_its_patches(setup):
    config = setup[4]
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 0, 0], [1] * 4 + [0] * 10])
    assert flops_lib.image_patch_counts(seg).tolist() == [4, 8, 4]
    small = flops_lib.train_step_flops(config, 100, 2, 128, True, image_patches=np.array([4, 4]))
    large = flops_lib.train_step_flops(config, 100, 2, 128, True, image_patches=np.array([4, 64]))
    frozen = flops_lib.train_step_flops(config, 100, 2, 128, False, image_patches=np.array([4, 64]))
    assert large > small and large > frozen > flops_lib.train_step_flops(config, 100, 0, 128, False)


def test_offline_plan_packs_under_both_budgets():
    """bfd with a patch budget: every sample once, no row over either budget or the image slots,
    and the patch budget is what binds (without it rows would exceed it)."""
    from allava_jax.data import binpack

    rng = np.random.default_rng(0)
    n = 3000
    patches = np.where(rng.random(n) < 0.8, 4 * rng.integers(4, 1024, n), 0)
    images = (patches > 0) * rng.integers(1, 3, n)
    lengths = rng.integers(20, 600, n) + patches // 4
    rows, method = binpack.pack(lengths, images, row_len=2048, max_images=6, patches=patches, max_patches=4096)
    assert method == "bfd" and sorted(i for r in rows for i in r) == list(range(n))
    assert all(lengths[r].sum() <= 2048 and patches[r].sum() <= 4096 and images[r].sum() <= 6 for r in rows)
    token_only = binpack.best_fit_decreasing(lengths, images, row_len=2048, max_images=6)
    assert max(patches[r].sum() for r in token_only) > 4096 and len(rows) > len(token_only)
    # Near the lower bound on rows that either budget alone sets.
    bound = max(lengths.sum() / 2048, patches.sum() / 4096)
    assert len(rows) < 1.05 * bound, (len(rows), bound)
    with pytest.raises(Exception, match="bucket"):
        binpack.pack(lengths, images, row_len=2048, max_images=6, method="bucket", patches=patches, max_patches=4096)


def test_offline_plan_measures_patches_from_headers_and_trains_on_its_rows(setup, tmp_path):
    """`data plan --max-patches`: image sizes from the headers only (a PNG whose pixel data is cut
    off still plans, then is a counted skip when its row is built); rows respect both budgets;
    the pipeline reads them as native rows; a run with another pixel budget is refused."""
    from allava_jax.data import plan as plan_lib
    from allava_jax.data.__main__ import main as data_main
    from allava_jax.errors import UserError

    tok, _, _, _, config = setup
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    root = str(tmp_path / "data")
    good = image_bytes(100, 90, fmt="PNG", seed=3)
    path, records = _write(root, bad=(("cut.png", good[: len(good) // 2]),))
    out = str(tmp_path / "p.plan")
    args = ["plan", "--data", path, "--image-root", root, "--template", "qwen2vl", "--tokenizer", str(tok_dir),
            "--seq-len", "256", "--max-images", "4", "--max-patches", "96", "--min-pixels", str(28 * 28),
            "--max-pixels", str(112 * 112), "--out", out, "--cache-dir", str(tmp_path / "c"), "--max-bad-fraction", "1"]
    assert data_main(args) == 0
    manifest = plan_lib.open_plan(out, sources.parse_sources([{"name": "n", "path": path, "image_root": root}], "qwen2vl"),
                                  tok, seq_len=256, num_image_tokens=0, max_images_per_row=4, native=SPEC,
                                  max_patches_per_row=96)
    assert manifest["counts"]["usable"] == len(records)  # the cut PNG's header is fine
    rows, stats = _packed_rows(setup, tmp_path, sources_cfg=[{"name": "n", "path": path, "image_root": root}],
                               seq_len=256, max_patches_per_row=96, packing_method="offline", plan=out, batch_size=1)
    assert {k: v for k, v in stats["skipped"].items() if v} == {"corrupt_image": 1}
    assert stats["samples"] == len(records) - 1 and len(rows) == manifest["rows"]
    assert all((r["patch_segments"] > 0).sum() <= 96 and r["patches"].shape[1] == 96 for r in rows)
    with pytest.raises(UserError, match="native"):
        _packed_rows(setup, tmp_path, sources_cfg=[{"name": "n", "path": path, "image_root": root}], seq_len=256,
                     max_patches_per_row=96, packing_method="offline", plan=out,
                     native=native.NativeSpec(28 * 28, 56 * 56))

