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

import numpy as np
from PIL import Image

from allava_jax.data.images import DEFAULT_MAX_PIXELS, ImageError, decode_image, normalize

PATCH, MERGE = 14, 2
MAX_ASPECT = 200
# LLaVA-OneVision-1.5-4B's preprocessor_config.json (evaluation uses max_pixels=3240000).
MIN_PIXELS, MAX_PIXELS = 3136, 2560000


@dataclasses.dataclass(frozen=True)
class NativeImage:
    """One processed image: ``patches`` [grid_h * grid_w, 3 * 14 * 14] float32 in block order."""

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
