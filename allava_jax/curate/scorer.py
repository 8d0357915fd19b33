"""A CLIP scorer checkpoint, run in fixed-size batches split over every device of a data mesh.

CLIPScore is Hessel et al.'s (arXiv 2104.08718; SynthVLM uses it as published):
``w * max(cos(image, "A photo depicts " + caption), 0)`` with ``w = 2.5``, the text cut at
CLIP's 77 tokens (BOS and EOS kept), and the image preprocessed as CLIP itself does (short side
resized, centre crop; see ``data.images.resize_center_crop``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from allava_jax import checkpoints
from allava_jax.data.images import normalize
from allava_jax.errors import UserError
from allava_jax.models.clip import ClipModel

PREFIX = "A photo depicts "
W = 2.5
TEXT_BUCKET = 16  # text batches are padded to a multiple of this many tokens (few compiled shapes)


def clip_score(image_embeds: np.ndarray, text_embeds: np.ndarray, w: float = W) -> np.ndarray:
    """Row-wise ``w * max(cos, 0)`` of unit embeddings."""
    return w * np.maximum(np.sum(image_embeds * text_embeds, axis=-1), 0.0)


class ClipScorer:
    """Image and caption embeddings from a ``convert import --clip`` checkpoint.

    Params are replicated and every batch is split over the mesh's devices (all local devices by
    default); a batch is padded to a power of two of rows up to ``batch_size`` (``_rows``), so few
    shapes compile and a short batch is not computed at full size. Blocks
    run unrolled by default (faster on CPU, as in training; pass ``scan_layers=True``
    where compile time matters more).
    """

    def __init__(self, checkpoint: str | Path, *, batch_size: int = 64, devices: Sequence[jax.Device] | None = None,
                 scan_layers: bool = False):
        self.config = checkpoints.load_clip_config(checkpoint)
        tok_dir = checkpoints.tokenizer_path(checkpoint)
        if tok_dir is None:
            raise UserError(f"{checkpoint}: the CLIP scorer checkpoint has no tokenizer/ directory")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        devices = list(devices or jax.local_devices())
        self.mesh = jax.sharding.Mesh(np.array(devices), ("data",))
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        replicated, split = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P("data"))
        self.params = jax.device_put(checkpoints.load_params(checkpoint, host=True), replicated)
        model = ClipModel(self.config, scan_layers=scan_layers)

        def apply(method, params, *inputs):
            return model.apply({"params": params}, *inputs, method=method)

        self._images = jax.jit(functools.partial(apply, ClipModel.image_embeds), in_shardings=(replicated, split),
                               out_shardings=replicated)
        self._texts = jax.jit(functools.partial(apply, ClipModel.text_embeds),
                              in_shardings=(replicated, split, split), out_shardings=replicated)

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def _batches(self, n: int):
        for start in range(0, n, self.batch_size):
            yield start, min(start + self.batch_size, n)

    def _rows(self, n: int) -> int:
        """Rows a batch of ``n`` is padded to: the next power of two, a multiple of the device
        count, at most ``batch_size``. (Padding every batch to ``batch_size`` ran a chunk's few
        distinct captions, e.g. 8 of 32 pairs with 4 images each, at the cost of 32.)"""
        devices = self.mesh.size
        rows = max(devices, 1 << max(n - 1, 0).bit_length())
        return min(-(-rows // devices) * devices, self.batch_size)

    def _pad(self, x: np.ndarray) -> np.ndarray:
        short = self._rows(len(x)) - len(x)
        return x if short == 0 else np.concatenate([x, np.zeros((short, *x.shape[1:]), x.dtype)])

    def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] (``resize_center_crop``ped) -> unit embeddings [N, projection_dim]."""
        out = []
        for s, e in self._batches(len(pixels)):
            batch = self._pad(normalize(pixels[s:e]))
            out.append(np.asarray(self._images(self.params, batch))[: e - s])
        return np.concatenate(out) if out else np.zeros((0, self.config.projection_dim), np.float32)

    def tokenize(self, texts: Sequence[str], prefix: str = PREFIX) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) int32 [N, T]: truncated at CLIP's context length, right-padded
        to a multiple of ``TEXT_BUCKET``."""
        limit = self.config.text.max_position_embeddings
        enc = self.tokenizer([prefix + t for t in texts], truncation=True, max_length=limit, padding="longest",
                             return_tensors="np")
        ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
        width = min(limit, -(-ids.shape[1] // TEXT_BUCKET) * TEXT_BUCKET)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = np.pad(ids, ((0, 0), (0, width - ids.shape[1])), constant_values=pad)
        return ids, np.pad(mask, ((0, 0), (0, width - mask.shape[1])))

    def embed_texts(self, texts: Sequence[str], prefix: str = PREFIX) -> np.ndarray:
        """Captions -> unit embeddings [N, projection_dim] of ``prefix + caption``."""
        out = []
        for s, e in self._batches(len(texts)):
            ids, mask = self.tokenize(texts[s:e], prefix)
            emb = self._texts(self.params, self._pad(ids), self._pad(mask))
            out.append(np.asarray(emb)[: e - s])
        return np.concatenate(out) if out else np.zeros((0, self.config.projection_dim), np.float32)
