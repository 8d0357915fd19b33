"""Checkpoint -> ``Engine``: params, config and the tokenizer saved beside them."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from allava_jax import checkpoints, compile_cache, storage
from allava_jax.data import pipeline as data_pipeline
from allava_jax.errors import UserError
from allava_jax.infer.engine import Engine

log = logging.getLogger(__name__)


def load_tokenizer(checkpoint: str | Path, tokenizer: str | Path | None = None):
    """The checkpoint's tokenizer (``<root>/tokenizer``) unless another directory is given."""
    path = tokenizer or checkpoints.tokenizer_path(checkpoint)
    if path is None:
        raise FileNotFoundError(f"{checkpoint}: no tokenizer/ directory; pass --tokenizer DIR")
    tok = data_pipeline.load_tokenizer(str(path))
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer at {path} has no EOS token")
    return tok


def load_engine(
    checkpoint: str | Path,
    *,
    tokenizer: str | Path | None = None,
    dtype: str | None = None,
    max_len: int | None = None,
    max_pixels: int | None = None,
    compile_cache_dir: str | None = None,
) -> Engine:
    """Everything ``generate`` / ``serve`` / ``eval`` need from a ``--checkpoint DIR``.

    ``dtype`` ("bfloat16"/"float32") sets the compute dtype; bf16 also stores params in bf16 to
    halve their memory. ``max_pixels`` (native-resolution models) caps each image's resized area,
    so its patches and tokens: what one image may cost a request. ``compile_cache_dir``: JAX's
    persistent compilation cache (None = the default directory, "" = off), so the next command
    loads the prefill and decode programs.
    """
    compile_cache.enable(compile_cache_dir)
    start = time.perf_counter()
    storage.check_access(checkpoint)  # a gs:// typo fails in seconds, with the path and the cause
    # On the host: cast and split there, then one device copy (``Engine``): the device never holds
    # the checkpoint's params beside the engine's.
    config, params = checkpoints.load_model(checkpoint, host=True)
    if max_pixels is not None:
        if config.vision.kind != "rice":
            raise UserError("--max-pixels applies to native-resolution (rice) models; this one resizes to "
                            f"{config.vision.image_size} px")
        if max_pixels < config.vision.min_pixels:
            raise UserError(f"--max-pixels {max_pixels} is below the model's min_pixels {config.vision.min_pixels}")
        config = config.replace(vision={"max_pixels": max_pixels})
    if dtype:
        config = config.replace(dtype=dtype)
        if jnp.dtype(dtype) != jnp.float32:
            params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
    engine = Engine(config, params, load_tokenizer(checkpoint, tokenizer), max_len=max_len)
    log.info("loaded %s (%s) in %.1fs", checkpoint, config.dtype, time.perf_counter() - start)
    return engine
