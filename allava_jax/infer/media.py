"""Images for inference: files, base64 data URLs and (when allowed) remote URLs -> model input.

Decoding and CLIP preprocessing come from ``allava_jax.data.images`` (native-resolution
processing, for a ``rice`` tower, from ``allava_jax.data.native``) so inference sees exactly the
pixels training saw. ``vision`` is the model's ``VisionConfig`` (or, for a CLIP tower, its image
size). Errors are ``MediaError`` with a message fit for an HTTP 400 answer.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

import numpy as np
from PIL.Image import Image as PILImage

from allava_jax import storage
from allava_jax.data import images as data_images
from allava_jax.data import native
from allava_jax.errors import UserError
from allava_jax.models.config import VisionConfig

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?)(;base64)?,(?P<data>.*)$", re.S)
MAX_IMAGE_BYTES = 32 * 1024 * 1024


class MediaError(UserError):
    """An image that cannot be used; the message says why."""


Image = np.ndarray | native.NativeImage  # one image as the model takes it


def is_native(vision: VisionConfig | int) -> bool:
    """Whether ``vision`` takes images at native resolution (a rice tower)."""
    return isinstance(vision, VisionConfig) and vision.kind == "rice"


def _size(vision: VisionConfig | int) -> int:
    return vision if isinstance(vision, int) else vision.image_size


def load_pixels(data: bytes, vision: VisionConfig | int) -> Image:
    """Encoded bytes -> float32 [S, S, 3] CLIP-normalised (pad to square, bicubic resize), or for a
    rice tower its patches and grid within ``vision.min_pixels .. max_pixels``."""
    try:
        if is_native(vision):
            return native.load_native(data, min_pixels=vision.min_pixels, max_pixels=vision.max_pixels)
        pixels = data_images.load_image(data, _size(vision))
    except data_images.ImageError as e:
        raise MediaError(f"not a usable image ({e})") from None
    return data_images.normalize(pixels)


def from_pil(img: PILImage, vision: VisionConfig | int) -> Image:
    """A PIL image (lmms-eval's visuals) -> model input, as ``load_pixels``."""
    img = img.convert("RGB")
    if is_native(vision):
        try:
            return native.preprocess_native(img, min_pixels=vision.min_pixels, max_pixels=vision.max_pixels)
        except data_images.ImageError as e:
            raise MediaError(f"not a usable image ({e})") from None
    return data_images.normalize(data_images.preprocess_pil(img, _size(vision)))


def stack(images: list[Image], vision: VisionConfig | int) -> np.ndarray | list[native.NativeImage] | None:
    """One prompt's images as ``Prompt.images``: [M, S, S, 3] (CLIP) or a list (rice); None if none."""
    if not images:
        return None
    return list(images) if is_native(vision) else np.stack(images)


def load_file(path: str | Path, vision: VisionConfig | int) -> Image:
    try:
        data = storage.as_path(path).read_bytes()
    except OSError as e:
        raise MediaError(f"cannot read image {path}: {e.strerror}") from None
    return load_pixels(data, vision)


def decode_data_url(url: str) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URL (raw base64 without the prefix is also accepted)."""
    m = _DATA_URL.match(url)
    payload = m.group("data") if m else url
    if m and m.group("mime") and not m.group("mime").startswith("image/"):
        raise MediaError(f"data URL has media type {m.group('mime')!r}, expected image/*")
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("image data URL is not valid base64") from None
    if not data:
        raise MediaError("image data URL is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise MediaError(f"image is larger than {MAX_IMAGE_BYTES} bytes")
    return data


def fetch_url(url: str, *, allow_remote: bool, timeout: float = 10.0) -> bytes:
    """Bytes behind an image URL: data URLs always, http(s) only when ``allow_remote``."""
    if url.startswith("data:"):
        return decode_data_url(url)
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise MediaError("remote image URLs are disabled on this server; send a base64 data URL")
        import httpx

        try:
            response = httpx.get(url, timeout=timeout, follow_redirects=True)
            response.raise_for_status()
        except httpx.HTTPError as e:
            raise MediaError(f"cannot fetch image URL: {e}") from None
        if len(response.content) > MAX_IMAGE_BYTES:
            raise MediaError(f"image is larger than {MAX_IMAGE_BYTES} bytes")
        return response.content
    raise MediaError("image_url must be a data:image/...;base64 URL" + (" or http(s) URL" if allow_remote else ""))
