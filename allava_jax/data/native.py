"""Native-resolution image processing (LLaVA-OneVision-1.5 / Qwen2-VL), vectorised numpy.

What transformers' ``Qwen2VLImageProcessor`` does with the release's ``preprocessor_config.json``
(``temporal_patch_size=1``, ``patch_size=14``, ``merge_size=2``, CLIP mean/std, bicubic): resize
each image to sides that are multiples of 28 within ``[min_pixels, max_pixels]`` keeping its
aspect (``smart_resize``), rescale and normalise, cut 14 x 14 patches and emit them in 2 x 2-block
order, each flattened (channel, row, column) to 588 floats. An image then costs
``grid_h * grid_w / 4`` decoder tokens. Images that cannot be processed raise ``ImageError`` with
a reason of ``quality.REASONS``, so pipelines skip and count them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from PIL import Image

from allava_jax.data.images import (CLIP_MEAN, CLIP_STD, DEFAULT_MAX_PIXELS, ImageError, decode_image,
                                    decode_image_header, normalize)

PATCH, MERGE = 14, 2
MAX_ASPECT = 200
# LLaVA-OneVision-1.5-4B's preprocessor_config.json (evaluation uses max_pixels=3240000).
MIN_PIXELS, MAX_PIXELS = 3136, 2560000


@dataclasses.dataclass(frozen=True)
class NativeImage:
    """One processed image: ``patches`` [grid_h * grid_w, 3 * 14 * 14] in block order, float32
    normalised, or uint8 in the training pipeline (4x less to move between workers; normalised by
    ``normalize_patches`` when its row is built), or none at all where only the grid matters
    (``data plan``: the header's size is enough)."""

    patches: np.ndarray
    grid: tuple[int, int]

    @property
    def num_tokens(self) -> int:
        """Decoder tokens of this image after the 2 x 2 merger."""
        return self.grid[0] * self.grid[1] // (MERGE * MERGE)


def smart_resize(height: int, width: int, factor: int = PATCH * MERGE, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The resized (H, W): each side rounded to a multiple of ``factor``; scaled down (floor) if
    the area exceeds ``max_pixels``, up (ceil) if below ``min_pixels`` (transformers' rule, so a
    grid is always at least 2 x 2 patches). Aspect ratios above 200 are refused."""
    if min(height, width) < PATCH:
        raise ImageError("image_too_small", f"{width}x{height} (a side under {PATCH} px)")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ImageError("image_aspect_ratio", f"{width}x{height} (aspect ratio above {MAX_ASPECT})")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(image: np.ndarray, patch: int = PATCH, merge: int = MERGE) -> np.ndarray:
    """A normalised image [H, W, 3] (sides multiples of ``patch * merge``) -> its patches
    [gh * gw, 3 * patch * patch] in merge x merge-block order, each flattened (channel, row, col)."""
    h, w, ch = image.shape
    gh, gw = h // patch, w // patch
    if gh * patch != h or gw * patch != w or gh % merge or gw % merge:
        raise ValueError(f"image {h}x{w} is not a multiple of {patch * merge} on both sides")
    x = image.reshape(gh // merge, merge, patch, gw // merge, merge, patch, ch)
    # -> [gh/m, gw/m, m (row in block), m (col in block), C, patch row, patch col]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 4, 6, 2, 5)).reshape(gh * gw, ch * patch * patch)


def preprocess_native(img: Image.Image, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> NativeImage:
    """An RGB PIL image -> its patches and grid (PIL bicubic resize on uint8, as transformers')."""
    height, width = img.height, img.width
    h, w = smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
    if (h, w) != (height, width):
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    pixels = normalize(np.asarray(img, dtype=np.uint8))
    return NativeImage(patchify(pixels), (h // PATCH, w // PATCH))


def load_native(data: bytes, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                max_decoded_pixels: int = DEFAULT_MAX_PIXELS) -> NativeImage:
    """Encoded bytes -> a processed image; ``ImageError`` (a counted skip) when it cannot be."""
    return preprocess_native(decode_image(data, max_pixels=max_decoded_pixels), min_pixels=min_pixels,
                             max_pixels=max_pixels)


@dataclasses.dataclass(frozen=True)
class NativeSpec:
    """How a training pipeline processes images at native resolution: the model's pixel budget per
    image (``VisionConfig.min_pixels`` / ``max_pixels``) and the authors' SFT cap on the longest
    side (``--image-resolution``: 1000 in stage 2; 0 = none), applied before ``smart_resize``."""

    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    max_side: int = 0

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """The (H, W) an image of ``width`` x ``height`` is processed at (multiples of 28)."""
        width, height = capped_size(width, height, self.max_side)
        return smart_resize(height, width, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(grid_h, grid_w) in 14 px patches: what the image costs, known from its header alone."""
        h, w = self.resized(width, height)
        return h // PATCH, w // PATCH


def capped_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(W, H) with the longer side scaled down to ``max_side`` keeping the aspect (the authors'
    SFT loader, before ``smart_resize``); unchanged when ``max_side`` is 0 or not exceeded."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, int(width * scale)), max(1, int(height * scale))


def load_native_uint8(data: bytes, spec: NativeSpec, *, max_decoded_pixels: int = DEFAULT_MAX_PIXELS) -> NativeImage:
    """Encoded bytes -> uint8 patches in block order and the grid (training: normalised later by
    ``normalize_patches``, bit-identical to ``load_native``); ``ImageError`` when unusable."""
    img = decode_image(data, max_pixels=max_decoded_pixels)
    capped = capped_size(img.width, img.height, spec.max_side)
    if capped != (img.width, img.height):
        img = img.resize(capped, Image.Resampling.NEAREST)
    h, w = spec.resized(img.width, img.height)
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    return NativeImage(patchify(np.asarray(img, dtype=np.uint8)), (h // PATCH, w // PATCH))


def header_native(data: bytes, spec: NativeSpec, *, max_decoded_pixels: int = DEFAULT_MAX_PIXELS) -> NativeImage:
    """An image's grid from its header alone (no pixels decoded; patches left empty): what
    ``data plan`` needs to count its tokens and patches. Same skips as decoding, except corrupt
    pixel data, which only decoding finds."""
    width, height = decode_image_header(data, max_pixels=max_decoded_pixels)
    grid = spec.grid(width, height)
    return NativeImage(np.zeros((0, 3 * PATCH * PATCH), np.uint8), grid)


def normalize_patches(patches: np.ndarray, mean: tuple[float, ...] = CLIP_MEAN,
                      std: tuple[float, ...] = CLIP_STD) -> np.ndarray:
    """uint8 patches [n, 3 * p * p] (channel-major rows) -> float32, per channel exactly as
    ``images.normalize`` does on the image (so training sees inference's values bit for bit)."""
    n, width = patches.shape
    scale = (np.asarray(std, np.float32) * np.float32(255.0))[:, None]
    offset = (np.asarray(mean, np.float32) / np.asarray(std, np.float32))[:, None]
    x = patches.reshape(n, 3, width // 3).astype(np.float32) / scale - offset
    return x.reshape(n, width)


def block_order(grid_h: int, grid_w: int, merge: int = 2) -> np.ndarray:
    """Row-major patch indices [gh * gw] in ``merge`` x ``merge``-block order: the blocks
    row-major, the patches of each block row-major (Qwen2-VL's processor order)."""
    idx = np.arange(grid_h * grid_w).reshape(grid_h // merge, merge, grid_w // merge, merge)
    return idx.transpose(0, 2, 1, 3).reshape(-1)


def block_coords(grid_h: int, grid_w: int, merge: int = 2) -> np.ndarray:
    """(row, col) [gh * gw, 2] of each patch in block order."""
    order = block_order(grid_h, grid_w, merge)
    return np.stack([order // grid_w, order % grid_w], axis=-1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Static lengths of packed rows: patches rounded up to a multiple of ``patch_multiple``,
    class slots to ``max_images``. On TPU/GPU kernels pick patch_multiple so that
    patches + class slots is a multiple of 128 (``kernels.LANES``)."""

    patch_multiple: int = 64
    max_images: int = 1


def pack_images(rows: Sequence[Sequence[tuple[np.ndarray, tuple[int, int]]]], buckets: Buckets = Buckets(),
                merge: int = 2, with_windows: bool = True) -> dict[str, np.ndarray]:
    """Rows of (patches [n, 3 p p] in block order, (grid_h, grid_w)) -> one packed vision batch:
    ``patches`` [B, P, 3 p p], ``patch_segments`` [B, P] (image k of a row, from 1, is k; 0 padding),
    ``coords`` [B, P, 2], ``cls_segments`` [B, K], ``kv_windows`` [B, P / m, W] (m =
    ``patch_multiple``): for each block of m patches, the W consecutive patch indices holding
    every image the block touches (XLA attention scores only those; ``windows``). P is the
    longest row's patch count rounded up to ``buckets.patch_multiple`` (a multiple of
    merge**2), K the most images of a row (at least ``buckets.max_images``). ``with_windows=False``
    leaves ``kv_windows`` out (training packs one row at a time into static shapes; W varies)."""
    lengths = [sum(len(p) for p, _ in row) for row in rows]
    unit = math.lcm(buckets.patch_multiple, merge * merge)
    n_patches = max(unit, -(-max(lengths, default=0) // unit) * unit)
    n_cls = max(buckets.max_images, max((len(row) for row in rows), default=0), 1)
    width = next((p.shape[1] for row in rows for p, _ in row), 3 * 14 * 14)
    out = {
        "patches": np.zeros((len(rows), n_patches, width), np.float32),
        "patch_segments": np.zeros((len(rows), n_patches), np.int32),
        "coords": np.zeros((len(rows), n_patches, 2), np.int32),
        "cls_segments": np.zeros((len(rows), n_cls), np.int32),
    }
    for r, row in enumerate(rows):
        at = 0
        for k, (patches, (gh, gw)) in enumerate(row, start=1):
            n = len(patches)
            if n != gh * gw:
                raise ValueError(f"image {k} of row {r}: {n} patches for a {gh}x{gw} grid")
            out["patches"][r, at:at + n] = patches
            out["patch_segments"][r, at:at + n] = k
            out["coords"][r, at:at + n] = block_coords(gh, gw, merge)
            out["cls_segments"][r, k - 1] = k
            at += n
    if with_windows:
        out["kv_windows"] = windows(out["patch_segments"], unit)
    return out


def windows(segments: np.ndarray, block: int) -> np.ndarray:
    """[B, P / block, W] key indices per query block of ``block`` patches: a span of W
    consecutive patches (W the widest any block needs, a multiple of ``block``) that holds each
    image the block touches, and the block itself (padding attends to padding). Spans are moved
    left to fit in the row, never shrunk."""
    b, p = segments.shape
    starts = np.zeros((b, p // block), np.int64)
    ends = np.zeros_like(starts)
    for r in range(b):
        seg = segments[r]
        first = {int(s): int(i) for i, s in reversed(list(enumerate(seg)))}  # segment -> first index
        last = {int(s): int(i) + 1 for i, s in enumerate(seg)}  # segment -> end
        for j in range(p // block):
            ids = [int(s) for s in np.unique(seg[j * block:(j + 1) * block]) if s]
            starts[r, j] = min([j * block] + [first[s] for s in ids])
            ends[r, j] = max([(j + 1) * block] + [last[s] for s in ids])
    width = min(p, -(-int((ends - starts).max(initial=block)) // block) * block)
    starts = np.minimum(starts, p - width)
    return (starts[..., None] + np.arange(width)).astype(np.int32)
