"""A stage that pretrains a from-scratch rice tower on its own captions, before the VLM stages.

The authors start LLaVA-OneVision-1.5 from a pretrained RICE-ViT (trained by cluster
discrimination: a multi-label classification of image embeddings, MLCD). A run with no
pretrained tower (the CPU demo, offline) gets a small stand-in here: each image's caption words,
as a multi-label target, classified from the mean of the tower's patch features.

Why: a decoder trained from scratch reads an image's tokens by what they hold only once they hold
it. With a random tower the LLaVA-OV-1.5 demo's decoder places the shape by where its colour sits
in the token sequence and names ~60 % of shapes (docs/llava_ov15_training.md, "The demo"). The
mean (not a max, nor the class token) makes every patch carry its image's words, which is how
the decoder's attention reads them.

Output: a whole model checkpoint at ``<workdir>/checkpoints``: the trained tower, the projector
and decoder at their random init, which the next stage starts from. Deterministic (seeded
shuffles, one host): a run killed here redoes the stage with the same result; a finished stage
is skipped. One process, every image's patches held in memory: meant for small towers and data
(the demo's).
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from allava_jax import checkpoints, storage
from allava_jax.data import native, pipeline
from allava_jax.data.images import ImageError, read_image_bytes
from allava_jax.data.sources import iter_json_records, parse_sources
from allava_jax.errors import UserError
from allava_jax.models import rice
from allava_jax.models.llava import init_params

log = logging.getLogger("allava_jax.train")
WORD = re.compile(r"[a-z]+")


def caption_words(record: dict) -> list[str]:
    """The lower-case words of a record's assistant turns (its caption, in a caption source)."""
    text = " ".join(t.get("value", "") for t in record.get("conversations", []) if t.get("from") == "gpt")
    return WORD.findall(text.lower())


def load_examples(sources: Any, spec: native.NativeSpec, chat_template: str) -> tuple[list, dict[str, int]]:
    """(image, caption words) of every record with one image in ``sources``; text-only records are
    not used; a record whose image cannot be used is skipped and counted by reason."""
    examples, skipped = [], {}
    for source in parse_sources(sources, chat_template):
        if source.is_tfds:
            raise UserError(f"source {source.name}: vision_pretrain reads JSON records, not a prepared TFDS directory")
        for i, raw in enumerate(iter_json_records(source.path)):
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if not isinstance(record, dict):
                log.warning("%s record %d: skipped, bad_json", source.path, i)
                skipped["bad_json"] = skipped.get("bad_json", 0) + 1
                continue
            image = record.get("image")
            if not isinstance(image, str):  # text-only (or several images): not used here
                continue
            try:
                data = read_image_bytes(image, list(source.image_roots))
                examples.append((native.load_native_uint8(data, spec), caption_words(record)))
            except ImageError as e:
                log.warning("%s record %d (%s): skipped, %s", source.path, i, image, e)
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
    if not examples:
        raise UserError("vision_pretrain: no record with an image in the stage's data.sources")
    return examples, skipped


def batches(examples: list, targets: np.ndarray, order: np.ndarray, batch_images: int, images_per_row: int):
    """Packed vision batches of ``batch_images`` images (``images_per_row`` a row) in ``order``, with
    their targets; the last partial batch is dropped."""
    for start in range(0, len(order) - batch_images + 1, batch_images):
        chosen = order[start : start + batch_images]
        images = [examples[i][0] for i in chosen]
        rows = [[(native.normalize_patches(x.patches), x.grid) for x in images[r : r + images_per_row]]
                for r in range(0, batch_images, images_per_row)]
        pack = native.pack_images(rows, native.Buckets(64, images_per_row), with_windows=False)
        yield pack, targets[chosen]


def mean_per_image(features: jax.Array, segments: jax.Array, images_per_row: int) -> jax.Array:
    """Patch features [R, P, D] -> each image's mean patch feature [R * K, D], in image order."""
    member = jax.nn.one_hot(segments - 1, images_per_row) * (segments > 0)[..., None]  # [R, P, K]
    total = jnp.einsum("rpk,rpd->rkd", member, features)
    return (total / jnp.maximum(member.sum(1), 1)[..., None]).reshape(-1, features.shape[-1])


def run(cfg: ConfigDict, workdir: Path) -> dict[str, Any]:
    """Pretrain ``cfg``'s model's tower on the stage's ``data.sources``; save the whole model."""
    from allava_jax.train.loop import model_config, tokenizer_dir

    out = Path(workdir) / "checkpoints"
    try:
        checkpoints.resolve(out)
        log.info("vision_pretrain: %s holds the finished stage; skipped", out)
        return {"status": "finished before"}
    except checkpoints.CheckpointNotFound:
        pass
    if storage.is_remote(str(workdir)) or jax.process_count() > 1:
        raise UserError("vision_pretrain runs on one host with a local workdir (a stand-in for a pretrained tower)")
    opts = cfg.vision_pretrain
    tokenizer = pipeline.load_tokenizer(tokenizer_dir(cfg))
    config = model_config(cfg, tokenizer)
    if config.vision.kind != "rice":
        raise UserError(f"vision_pretrain needs a rice tower; the model's is {config.vision.kind!r}")
    if opts.batch_images % opts.images_per_row:
        raise UserError("vision_pretrain.batch_images must be a multiple of images_per_row")
    params = init_params(config, jax.random.key(cfg.seed))  # the whole model: the next stage starts from it
    if opts.epochs == 0:  # the random init, as a stage that trains from scratch would start (no stand-in)
        checkpoints.save_model(out, params, config, tokenizer_dir=tokenizer_dir(cfg))
        return {"epochs": 0}
    spec = native.NativeSpec(config.vision.min_pixels, config.vision.max_pixels, cfg.data.get("max_image_side", 0))
    examples, skipped = load_examples(cfg.data.sources, spec, config.chat_template)
    if len(examples) < opts.batch_images:
        raise UserError(f"vision_pretrain: {len(examples)} images, fewer than one batch ({opts.batch_images})")
    vocab = sorted({w for _, words in examples for w in words})
    index = {w: i for i, w in enumerate(vocab)}
    targets = np.zeros((len(examples), len(vocab)), np.float32)
    for n, (_, words) in enumerate(examples):
        targets[n, [index[w] for w in words]] = 1.0

    tower = rice.RiceVision(config.vision, dtype=config.compute_dtype, scan_layers=config.scan_layers)
    head = nn.Dense(len(vocab))
    weights = {"tower": params["vision"],
               "head": head.init(jax.random.key(cfg.seed + 1), jnp.zeros((1, config.vision.hidden_size)))["params"]}
    optimizer = optax.adam(opts.lr)
    state = optimizer.init(weights)

    def loss_fn(weights: dict, pack: dict, target: jax.Array) -> jax.Array:
        features = tower.apply({"params": weights["tower"]}, pack)
        pooled = mean_per_image(features, pack["patch_segments"], opts.images_per_row)
        logits = head.apply({"params": weights["head"]}, pooled)
        return optax.sigmoid_binary_cross_entropy(logits, target).sum(-1).mean()

    @jax.jit
    def step(weights: dict, state: optax.OptState, pack: dict, target: jax.Array):
        loss, grads = jax.value_and_grad(loss_fn)(weights, pack, target)
        updates, state = optimizer.update(grads, state, weights)
        return optax.apply_updates(weights, updates), state, loss

    start, losses = time.perf_counter(), []
    for epoch in range(opts.epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(examples))
        epoch_losses = []
        for pack, target in batches(examples, targets, order, opts.batch_images, opts.images_per_row):
            weights, state, loss = step(weights, state, pack, target)
            epoch_losses.append(float(loss))
        losses.append(float(np.mean(epoch_losses)))
        log.info("vision_pretrain epoch %d/%d: loss %.4f (%.0f s)", epoch + 1, opts.epochs, losses[-1],
                 time.perf_counter() - start)
    params["vision"] = weights["tower"]
    checkpoints.save_model(out, params, config, tokenizer_dir=tokenizer_dir(cfg))
    return {"images": len(examples), "words": len(vocab), "epochs": int(opts.epochs), "epoch_losses": losses,
            "skipped": skipped, "skipped_total": sum(skipped.values())}
