"""Per-record work: parse JSON, load images, apply the chat template. Runs in grain workers.

`ExampleBuilder` turns a source element (see `sources`) into a training example::

    {"tokens": int32 [T], "targets": int32 [T], "loss_mask": bool [T],
     "images": uint8 [n, S, S, 3], "sample": int64 [T] (global record key + 1, for checks)}

At native resolution (``native`` given: a rice tower) ``images`` is a list of
``native.NativeImage`` (uint8 patches in block order, grid) and each image's placeholder run is
its own ``grid_h * grid_w / 4`` tokens, so images are read before the text is tokenized.

or into a `quality.BadSample` (never raises for bad data), so one bad record costs one skip.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from allava_jax.data import images as images_lib
from allava_jax.data import native as native_lib
from allava_jax.data import templates
from allava_jax.data.quality import BadSample
from allava_jax.data.sources import SourceSpec


def record_id(record: Any, index: int) -> str:
    """ALLaVA uses `id`; Evol-Instruct uses `idx`; fall back to the position in the file."""
    if isinstance(record, dict):
        for key in ("id", "idx"):
            if record.get(key) is not None:
                return str(record[key])
    return f"#{index}"


class ExampleBuilder(grain.transforms.Map):
    """Source element -> example dict or BadSample. Picklable (tokenizer included)."""

    def __init__(
        self,
        specs: Sequence[SourceSpec],
        tokenizer: Any,
        *,
        seq_len: int,
        image_size: int,
        num_image_tokens: int,
        image_token_id: int,
        max_images_per_sample: int,
        truncate: bool = True,
        max_pixels: int = images_lib.DEFAULT_MAX_PIXELS,
        jpeg_draft: bool = False,
        decode_images: bool = True,
        read_images: bool = True,
        native: native_lib.NativeSpec | None = None,
        max_patches_per_sample: int = 0,
    ):
        self._specs = list(specs)
        self._tokenizer = tokenizer
        # Each template's answer-end id, resolved now so a tokenizer that lacks one fails at once.
        self._end_ids = {t: templates.answer_end_id(tokenizer, t) for t in {s.template for s in self._specs}}
        self._seq_len = seq_len
        self._image_size = image_size
        self._num_image_tokens = num_image_tokens
        self._image_token_id = image_token_id
        self._max_images = max_images_per_sample
        self._truncate = truncate
        self._max_pixels = max_pixels
        self._jpeg_draft = jpeg_draft
        self._decode_images = decode_images
        self._read_images = read_images  # False: lengths only (`plan`); native: headers only
        self._native = native
        self._max_patches = max_patches_per_sample  # native: 0 = no limit
        # Index offsets so that (source, index) maps to one global int key.
        self._key_stride = 1 << 40

    def map(self, element: dict[str, Any]) -> dict[str, Any] | BadSample:
        spec = self._specs[element["source"]]
        index = element["index"]
        record = None
        try:
            record = json.loads(element["record"])
            if not isinstance(record, dict):
                raise templates.SampleError("bad_json", "record is not an object")
            paths = templates.image_paths(record)
            if len(paths) > self._max_images:
                raise templates.SampleError("too_many_images", f"{len(paths)} > {self._max_images}")
            if self._native is not None:
                images = self._load_native(paths, element.get("images"), spec)
                num_image_tokens: int | list[int] = [im.num_tokens for im in images]
            else:
                num_image_tokens = self._num_image_tokens
            example = templates.encode_record(
                record, self._tokenizer, template=spec.template, num_images=len(paths),
                seq_len=self._seq_len, eos_id=self._end_ids[spec.template], image_token_id=self._image_token_id,
                num_image_tokens=num_image_tokens, truncate=self._truncate,
            )
            example["images"] = images if self._native is not None else self._load_images(
                paths, element.get("images"), spec)
        except (templates.SampleError, images_lib.ImageError) as e:
            return BadSample(e.reason, spec.name, spec.path, record_id(record, index), e.detail)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return BadSample("bad_json", spec.name, spec.path, f"#{index}", str(e))
        key = element["source"] * self._key_stride + index + 1
        example["sample"] = np.full(len(example["tokens"]), key, np.int64)
        return example

    def _load_native(self, paths: list[str], inline: list[bytes] | None, spec: SourceSpec) -> list[native_lib.NativeImage]:
        """Native-resolution images (uint8 patches), or only their grids from the headers when
        pixels are not needed (``check`` without decoding, ``plan``)."""
        if inline is not None and len(inline) != len(paths):
            raise templates.SampleError("image_count_mismatch", f"{len(inline)} stored images")
        out = []
        for i, path in enumerate(paths):
            data = inline[i] if inline is not None else images_lib.read_image_bytes(path, list(spec.image_roots))
            if self._decode_images and self._read_images:
                out.append(native_lib.load_native_uint8(data, self._native, max_decoded_pixels=self._max_pixels))
            else:
                out.append(native_lib.header_native(data, self._native, max_decoded_pixels=self._max_pixels))
        patches = sum(im.grid[0] * im.grid[1] for im in out)
        if self._max_patches and patches > self._max_patches:
            raise templates.SampleError("too_many_patches", f"{patches} patches > max_patches_per_row {self._max_patches}")
        return out

    def _load_images(self, paths: list[str], inline: list[bytes] | None, spec: SourceSpec) -> np.ndarray:
        size = self._image_size
        if inline is not None and len(inline) != len(paths):
            raise templates.SampleError("image_count_mismatch", f"{len(inline)} stored images")
        if not (self._decode_images and self._read_images):
            size = 1  # `check` without decoding, `plan`: only lengths matter.
        out = np.zeros((len(paths), size, size, 3), np.uint8)
        if not self._read_images:
            return out
        for i, path in enumerate(paths):
            data = inline[i] if inline is not None else images_lib.read_image_bytes(path, list(spec.image_roots))
            if self._decode_images:
                out[i] = images_lib.load_image(
                    data, size, max_pixels=self._max_pixels, jpeg_draft=self._jpeg_draft
                )
            else:
                images_lib.decode_image_header(data, max_pixels=self._max_pixels)
        return out
