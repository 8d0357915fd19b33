"""How fast the ``demo_ov15`` vision tower learns the demo's shapes, read out two ways.

    python benchmarks/demo_readout.py [--pools mean,max] [--epochs 5] [--sizes 112x112,...] [--probe [--checkpoint DIR]]

Trains the tower from scratch (random init, as the demo does) with one linear layer on top as a
4-way shape classifier on freshly drawn demo images (the native variant's sizes unless
``--sizes``), 2000 to train and 384 held out, Adam at 1e-3, batches of 32 images packed 4 per
row; each image's patch features are pooled by their mean or their maximum. Prints held-out
shape accuracy after each epoch.

``--probe``: the tower stays at its random init and only the linear layer learns (a linear probe,
on standardised features, full batch, Adam 1e-2, 500 steps), for ``--pools`` among mean, max and
mean+max (the two concatenated): how much of the shape a readout can get from untrained features.
``--checkpoint DIR``: probe that checkpoint's tower instead (e.g. the demo's ``runs/demo_ov15/stage0``,
its pretrained tower, or a stage 2 trained without stage 0): how much training taught the tower.

Why it exists: without its stage 0, ``configs/demo_ov15.py`` names every colour but only ~60 % of
shapes. A decoder reads an image's tokens through soft attention, which at the start of training
weighs them about evenly, so the tower learns through it as through a mean; this shows how much
faster it learns when the readout can pick out the few tokens on the shape's outline
(docs/llava_ov15_training.md, "The demo").
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from allava_jax import checkpoints  # noqa: E402
from allava_jax.data import demo, native  # noqa: E402
from allava_jax.models import rice  # noqa: E402
from allava_jax.models.config import get_preset  # noqa: E402

IMAGES_PER_ROW, BATCH, TRAIN, HELD_OUT = 4, 32, 2000, 384


def draw_images(sizes: list[tuple[int, int]], n: int, seed: int = 0) -> list[tuple[object, int]]:
    """``n`` demo images (one coloured shape on grey, as ``demo.make_demo_dataset``) and their shape ids."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        attrs = demo.random_attributes(rng)
        width, height = rng.choice(sizes)
        out.append((demo.draw(*attrs, rng, pixels=width, height=height), demo.SHAPES.index(attrs[1])))
    return out


def packed(items: list, vision) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A packed vision batch of ``items`` (``IMAGES_PER_ROW`` images a row) and their labels."""
    images = [native.preprocess_native(img, min_pixels=vision.min_pixels, max_pixels=vision.max_pixels) for img, _ in items]
    rows = [[(x.patches, x.grid) for x in images[i:i + IMAGES_PER_ROW]] for i in range(0, len(images), IMAGES_PER_ROW)]
    pack = native.pack_images(rows, native.Buckets(64, IMAGES_PER_ROW), with_windows=False)
    return pack, np.array([label for _, label in items])


def pool_images(features: jax.Array, pack: dict, pool: str) -> jax.Array:
    """Patch features [R, P, D] -> one vector per image [R * K, D] (image order): their mean or max."""
    seg = pack["patch_segments"]
    member = (jax.nn.one_hot(seg - 1, IMAGES_PER_ROW) * (seg > 0)[..., None])[..., None]  # [R, P, K, 1]
    if pool == "max":
        per_image = jnp.max(jnp.where(member > 0, features[:, :, None], -jnp.inf), axis=1)
    else:
        per_image = jnp.sum(member * features[:, :, None], axis=1) / jnp.maximum(jnp.sum(member, axis=1), 1)
    return per_image.reshape(-1, features.shape[-1])


def datasets(sizes: list[tuple[int, int]], vision) -> tuple[list, tuple]:
    """The training batches (``BATCH`` images each) and the held-out batch, packed for ``vision``."""
    data = draw_images(sizes, TRAIN + HELD_OUT)
    batches = [packed(data[i:i + BATCH], vision) for i in range(0, TRAIN - BATCH + 1, BATCH)]
    return batches, packed(data[TRAIN:], vision)


def probe(pools: list[str], vision, batches: list, held_out: tuple, tower_params: dict | None = None) -> dict[str, float]:
    """Held-out accuracy of a linear probe on a tower's pooled features (``tower_params``, default
    a random init), per entry of ``pools`` (mean, max, or mean+max). The tower runs once per
    batch; every pool reads that.
    The probe is a full-batch softmax regression in optax, so the benchmark needs nothing beyond
    requirements.txt (scikit-learn is an eval extra)."""
    tower = rice.RiceVision(vision, scan_layers=False)
    params = tower_params if tower_params is not None else tower.init(jax.random.key(0), batches[0][0])["params"]
    kinds = sorted({k for p in pools for k in p.split("+")})
    features = jax.jit(lambda pack: {k: pool_images(tower.apply({"params": params}, pack), pack, k) for k in kinds})
    train_f = [features(pack) for pack, _ in batches]
    pooled = {k: np.concatenate([np.asarray(f[k]) for f in train_f]) for k in kinds}
    held_f = {k: np.asarray(v) for k, v in features(held_out[0]).items()}
    train_y, test_y = np.concatenate([labels for _, labels in batches]), held_out[1]
    head, opt = nn.Dense(len(demo.SHAPES)), optax.adam(1e-2)
    out = {}
    for spec in pools:
        train_x = np.concatenate([pooled[k] for k in spec.split("+")], axis=-1)
        mean, std = train_x.mean(0), train_x.std(0) + 1e-6
        test_x = (np.concatenate([held_f[k] for k in spec.split("+")], axis=-1) - mean) / std
        weights = head.init(jax.random.key(1), train_x[:1])["params"]
        state = opt.init(weights)
        x, y = jnp.asarray((train_x - mean) / std), jnp.asarray(train_y)

        @jax.jit
        def step(weights: dict, state: optax.OptState, x: jax.Array, y: jax.Array):
            grads = jax.grad(lambda w: optax.softmax_cross_entropy_with_integer_labels(head.apply({"params": w}, x), y).mean())(weights)
            updates, state = opt.update(grads, state, weights)
            return optax.apply_updates(weights, updates), state

        for _ in range(500):
            weights, state = step(weights, state, x, y)
        out[spec] = float(np.mean(np.asarray(head.apply({"params": weights}, test_x)).argmax(-1) == test_y))
    return out


def train(pool: str, epochs: int, vision, batches: list, held_out: tuple) -> tuple[list[float], float]:
    """Held-out accuracy after each epoch, and the seconds taken."""
    tower, head = rice.RiceVision(vision, scan_layers=False), nn.Dense(len(demo.SHAPES))

    def pooled(params: dict, pack: dict) -> jax.Array:
        return pool_images(tower.apply({"params": params["tower"]}, pack), pack, pool)

    def loss(params: dict, pack: dict, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = head.apply({"params": params["head"]}, pooled(params, pack))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), jnp.mean(logits.argmax(-1) == labels)

    params = {"tower": tower.init(jax.random.key(0), batches[0][0])["params"],
              "head": head.init(jax.random.key(1), jnp.zeros((1, vision.hidden_size)))["params"]}
    opt = optax.adam(1e-3)
    state = opt.init(params)

    @jax.jit
    def step(params: dict, state: optax.OptState, pack: dict, labels: jax.Array):
        grads = jax.grad(lambda p: loss(p, pack, labels)[0])(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    evaluate = jax.jit(loss)
    accuracy, start = [], time.perf_counter()
    for _ in range(epochs):
        for pack, labels in batches:
            params, state = step(params, state, pack, labels)
        accuracy.append(float(evaluate(params, *held_out)[1]))
    return accuracy, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pools", default="mean,max", help="comma-separated: mean, max (--probe: also mean+max)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--sizes", default="", help="image sizes WxH, comma-separated (default: the native demo's)")
    parser.add_argument("--probe", action="store_true", help="a linear probe on the random tower's features instead")
    parser.add_argument("--checkpoint", default="", help="with --probe: probe this demo_ov15 checkpoint's tower")
    args = parser.parse_args(argv)
    if args.checkpoint and not args.probe:
        parser.error("--checkpoint goes with --probe")
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")] if args.sizes else list(demo.NATIVE_SIZES)
    pools = args.pools.split(",")
    allowed = ("mean", "max", "mean+max", "max+mean") if args.probe else ("mean", "max")
    if bad := [p for p in pools if p not in allowed]:
        parser.error(f"--pools: {bad[0]!r} is not one of {', '.join(allowed)}")
    vision, tower_params = get_preset("demo_ov15").vision, None
    if args.checkpoint:
        config, params = checkpoints.load_model(args.checkpoint)
        vision, tower_params = config.vision, params["vision"]
    batches, held_out = datasets(sizes, vision)  # the same images for every pool
    tower = f"the tower of {args.checkpoint}" if args.checkpoint else "the random demo_ov15 tower"
    what = f"linear probe on {tower}" if args.probe else "demo_ov15 tower as a shape classifier"
    print(f"{what}: {TRAIN} images, {HELD_OUT} held out, sizes " + ", ".join(f"{w}x{h}" for w, h in sizes))
    if args.probe:
        print("| pool | held-out shape accuracy |\n|---|---|")
        for pool, accuracy in probe(pools, vision, batches, held_out, tower_params).items():
            print(f"| {pool} | {accuracy:.1%} |", flush=True)
        return
    print("| pool | " + " | ".join(f"epoch {e + 1}" for e in range(args.epochs)) + " | seconds |")
    print("|---" * (args.epochs + 2) + "|")
    for pool in pools:
        accuracy, seconds = train(pool, args.epochs, vision, batches, held_out)
        print(f"| {pool} | " + " | ".join(f"{a:.1%}" for a in accuracy) + f" | {seconds:.0f} |", flush=True)

if __name__ == "__main__":
    main()
