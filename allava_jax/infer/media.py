"""Images for inference: files, base64 data URLs and (when allowed) remote URLs -> model input.

Decoding and CLIP preprocessing come from ``allava_jax.data.images`` so inference sees exactly the
pixels training saw. Errors are ``MediaError`` with a message fit for an HTTP 400 answer.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

import numpy as np

from allava_jax.data import images as data_images
from allava_jax.errors import UserError

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?)(;base64)?,(?P<data>.*)$", re.S)
MAX_IMAGE_BYTES = 32 * 1024 * 1024


class MediaError(UserError):
    """An image that cannot be used; the message says why."""


def load_pixels(data: bytes, image_size: int) -> np.ndarray:
    """Encoded bytes -> float32 [S, S, 3] CLIP-normalised (pad to square, bicubic resize)."""
    try:
        pixels = data_images.load_image(data, image_size)
    except data_images.ImageError as e:
        raise MediaError(f"not a usable image ({e})") from None
    return data_images.normalize(pixels)


def load_file(path: str | Path, image_size: int) -> np.ndarray:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise MediaError(f"cannot read image {path}: {e.strerror}") from None
    return load_pixels(data, image_size)


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
