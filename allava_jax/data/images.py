"""Image decoding and CLIP preprocessing, matching LLaVA/ALLaVA training exactly.

The reference is LLaVA's `expand2square` (pad to square with the CLIP mean colour) followed by
`transformers.CLIPImageProcessor` (PIL bicubic resize, centre crop, rescale, normalise). The PIL
resize produces uint8, so we keep images uint8 through packing (4x less memory to copy between
worker processes) and normalise whole batches at the end with `normalize`.

Failures raise `ImageError` with a `reason` from `quality.REASONS`, so the pipeline can skip and
count them instead of stopping.
"""

from __future__ import annotations

import io
import os
import posixpath
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

from allava_jax import storage

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# LLaVA pads with tuple(int(x * 255) for x in image_mean).
CLIP_MEAN_RGB = tuple(int(x * 255) for x in CLIP_MEAN)
# A 336 px model never needs more than this; larger headers are treated as decompression bombs.
DEFAULT_MAX_PIXELS = 64_000_000


class ImageError(Exception):
    """An image that cannot be used; `reason` is a key of `quality.REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def resolve_image_path(rel: str, roots: list[str]) -> str:
    """Returns the first existing `root/rel`, refusing paths that escape their root.

    Why: image paths come from downloaded JSON; `../../etc/passwd` or an absolute path must not be
    read. Raises ImageError('image_path_escapes' | 'missing_image'). A root may be on object
    storage (``gs://``): there `rel` is normalised as a key and must stay below the root.
    """
    if not isinstance(rel, str) or not rel:
        raise ImageError("missing_image", f"bad image path {rel!r}")
    if os.path.isabs(rel):
        raise ImageError("image_path_escapes", rel)
    tried = []
    for root in roots:
        if storage.is_remote(root):
            key = posixpath.normpath(rel)
            if key == ".." or key.startswith("../"):
                raise ImageError("image_path_escapes", f"{rel} leaves {root}")
            path = storage.as_path(root) / key
            if path.is_file():
                return os.fspath(path)
            tried.append(os.fspath(path))
            continue
        root_real = os.path.realpath(root)
        path = os.path.realpath(os.path.join(root_real, rel))
        if os.path.commonpath([root_real, path]) != root_real:
            raise ImageError("image_path_escapes", f"{rel} leaves {root}")
        if os.path.isfile(path):
            return path
        tried.append(path)
    raise ImageError("missing_image", "not found: " + ", ".join(tried) if tried else "no image root")


def read_image_bytes(rel: str, roots: list[str]) -> bytes:
    """Reads an image file below one of `roots` (see `resolve_image_path`)."""
    path = resolve_image_path(rel, roots)
    with (storage.as_path(path).open("rb") if storage.is_remote(path) else open(path, "rb")) as f:
        data = f.read()
    if not data:
        raise ImageError("empty_image", path)
    return data


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited on white, as transformers' convert_rgb."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: PIL's convert('RGB') clips instead of scaling.
        arr = np.asarray(img, dtype=np.float64)
        hi = max(float(arr.max()), 1.0)
        arr = np.clip(arr * (255.0 / hi), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return img.convert("RGB")


def _has_orientation(img: Image.Image) -> bool:
    """Whether EXIF asks for a rotation/flip (avoids exif_transpose's full copy otherwise)."""
    return img.getexif().get(0x0112, 1) not in (None, 1)


def check_complete(data: bytes) -> None:
    """Raise ``OSError`` when ``data`` is a truncated image, whatever PIL's process-wide
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` says: lmms-eval and tensorflow-datasets set it on import,
    and under it ``load`` pads a truncated file silently. ``verify`` checks a PNG's chunks to the
    end; a JPEG must end with its end-of-image marker."""
    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format
        im.verify()
    if fmt == "JPEG" and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        raise OSError("no JPEG end marker: truncated")


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> Image.Image:
    """Decodes JPEG/PNG/WebP/GIF (first frame) bytes into an upright RGB PIL image.

    `draft_size` lets libjpeg decode at 1/2, 1/4 or 1/8 scale (still >= draft_size px): much
    faster, but pixels differ slightly from the full-size reference, so it is off by default.
    """
    if not data:
        raise ImageError("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageError("corrupt_image", "zero-size image")
            if width * height > max_pixels:
                raise ImageError("image_too_large", f"{width}x{height} > {max_pixels} pixels")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            if ImageFile.LOAD_TRUNCATED_IMAGES:  # another library relaxed PIL: check the bytes ourselves
                check_complete(data)
            img = ImageOps.exif_transpose(img, in_place=False) if _has_orientation(img) else img
            return _to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("image_too_large", str(e)) from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.UnidentifiedImageError) as e:
        raise ImageError("corrupt_image", f"{type(e).__name__}: {e}") from None


def decode_image_header(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Cheap validation (format + size from the header, no pixel decode) for `check`."""
    if not data:
        raise ImageError("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(data)).size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("image_too_large", str(e)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError("corrupt_image", f"{type(e).__name__}: {e}") from None
    if width <= 0 or height <= 0:
        raise ImageError("corrupt_image", "zero-size image")
    if width * height > max_pixels:
        raise ImageError("image_too_large", f"{width}x{height} > {max_pixels} pixels")
    return width, height


def expand2square(img: Image.Image, background: tuple[int, int, int] = CLIP_MEAN_RGB) -> Image.Image:
    """LLaVA's pad-to-square: centre the image on a square of the background colour."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), background)
    result.paste(img, ((side - width) // 2, (side - height) // 2))
    return result


def preprocess_pil(img: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> padded, bicubic-resized uint8 [size, size, 3] (not yet normalised)."""
    img = expand2square(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """CLIP's own preprocessing (``CLIPImageProcessor``, and OpenAI's ``clip.load`` transform):
    the short side bicubic-resized to ``size`` (the long one to ``int(size * long / short)``),
    then a centre ``size`` x ``size`` crop; uint8, not yet normalised. Used for scoring, where
    CLIPScore is defined with this crop, not with LLaVA's pad-to-square."""
    width, height = img.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new = (size, new_long) if width <= height else (new_long, size)
    if new != img.size:
        img = img.resize(new, Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def load_image(
    data: bytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS, jpeg_draft: bool = False
) -> np.ndarray:
    """Encoded bytes -> uint8 [size, size, 3], ready for `normalize`."""
    img = decode_image(data, max_pixels=max_pixels, draft_size=size if jpeg_draft else None)
    return preprocess_pil(img, size)


def normalize(
    images: np.ndarray, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
) -> np.ndarray:
    """uint8 [..., 3] -> float32 CLIP-normalised, (x / 255 - mean) / std."""
    scale = np.asarray(std, np.float32) * np.float32(255.0)
    offset = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    return images.astype(np.float32) / scale - offset
