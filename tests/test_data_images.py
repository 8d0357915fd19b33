"""Image decoding/preprocessing: parity with transformers' PIL CLIP processor, and bad images."""

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from allava_jax.data import images as L
from data_fixtures import image_bytes

SIZE = 48


def _reference(data: bytes, size: int) -> np.ndarray:
    """LLaVA's way: PIL open (+EXIF) -> RGB -> expand2square(mean) -> CLIPImageProcessor (PIL)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    img = img.convert("RGB")
    w, h = img.size
    side = max(w, h)
    sq = Image.new("RGB", (side, side), (122, 116, 104))
    sq.paste(img, ((side - w) // 2, (side - h) // 2))
    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return proc(images=sq, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def _exif_rotated_jpeg() -> bytes:
    img = Image.open(io.BytesIO(image_bytes(64, 30, seed=5)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


CASES = {
    "rgb_jpeg_landscape": image_bytes(60, 40),
    "rgb_jpeg_891x770": image_bytes(891, 770, seed=1),
    "grey_png_portrait": image_bytes(33, 77, fmt="PNG", mode="L", seed=2),
    "rgba_png_square": image_bytes(50, 50, fmt="PNG", mode="RGBA", seed=3),
    "palette_gif_tall": image_bytes(20, 90, fmt="GIF", mode="P", seed=4),
    "webp_wide": image_bytes(70, 30, fmt="WEBP", seed=6),
    "cmyk_jpeg": image_bytes(45, 61, mode="CMYK", seed=7),
    "tiny_upscaled": image_bytes(7, 3, fmt="PNG", seed=8),
    "exif_rotated_jpeg": _exif_rotated_jpeg(),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_clip_image_processor(name):
    data = CASES[name]
    ours = L.normalize(L.load_image(data, SIZE))
    ref = _reference(data, SIZE)
    assert ours.shape == ref.shape == (SIZE, SIZE, 3)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_rgba_transparency_is_white():
    img = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert (np.asarray(L.decode_image(buf.getvalue())) == 255).all()


def test_exif_orientation_applied_exactly():
    stored = np.random.default_rng(0).integers(0, 255, (6, 10, 3), dtype=np.uint8)
    img = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif)
    out = np.asarray(L.decode_image(buf.getvalue()))
    np.testing.assert_array_equal(out, np.rot90(stored, k=-1))  # displayed upright: 90 deg CW


def test_gif_first_frame():
    frames = [Image.new("RGB", (9, 9), c) for c in ((200, 0, 0), (0, 200, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = np.asarray(L.decode_image(buf.getvalue()))
    assert out[4, 4, 0] > 150 and out[4, 4, 1] < 50


def test_expand2square_centres_with_mean_colour():
    img = Image.new("RGB", (4, 2), (255, 255, 255))
    out = np.asarray(L.expand2square(img))
    assert out.shape == (4, 4, 3)
    assert (out[0] == (122, 116, 104)).all() and (out[1] == 255).all() and (out[2] == 255).all()
    assert (out[3] == (122, 116, 104)).all()


def _png_with_size(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header claims width x height (a decompression bomb)."""
    data = bytearray(image_bytes(4, 4, fmt="PNG"))
    ihdr = 8  # after the signature: length(4) type(4) data(13) crc(4)
    data[ihdr + 8: ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4: ihdr + 8 + 13])) & 0xFFFFFFFF
    data[ihdr + 8 + 13: ihdr + 8 + 17] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty_image"),
    (b"not an image at all", "corrupt_image"),
    (image_bytes(64, 64)[:300], "corrupt_image"),  # truncated JPEG
    (_png_with_size(30000, 30000), "image_too_large"),  # above PIL's own bomb limit too
    (_png_with_size(5000, 5000), "image_too_large"),  # above our max_pixels below
])
def test_bad_image_bytes(data, reason):
    with pytest.raises(L.ImageError) as e:
        L.load_image(data, SIZE, max_pixels=10_000_000)
    assert e.value.reason == reason
    if reason != "empty_image":
        with pytest.raises(L.ImageError) as e:
            L.decode_image_header(data, max_pixels=10_000_000) if reason == "image_too_large" else L.load_image(data, SIZE)
        assert e.value.reason == reason


def test_resolve_image_path(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (b / "x.jpg").write_bytes(b"1")
    (a / "x.jpg").write_bytes(b"2")
    (b / "only_b.jpg").write_bytes(b"3")
    (tmp_path / "secret.jpg").write_bytes(b"4")
    os.symlink(tmp_path / "secret.jpg", a / "link.jpg")
    assert L.read_image_bytes("x.jpg", [str(a), str(b)]) == b"2"  # first root wins
    assert L.read_image_bytes("only_b.jpg", [str(a), str(b)]) == b"3"
    for rel in ("../secret.jpg", str(tmp_path / "secret.jpg"), "link.jpg", "sub/../../secret.jpg"):
        with pytest.raises(L.ImageError) as e:
            L.read_image_bytes(rel, [str(a)])
        assert e.value.reason == "image_path_escapes", rel
    with pytest.raises(L.ImageError) as e:
        L.read_image_bytes("nope.jpg", [str(a), str(b)])
    assert e.value.reason == "missing_image"
    (a / "empty.jpg").write_bytes(b"")
    with pytest.raises(L.ImageError) as e:
        L.read_image_bytes("empty.jpg", [str(a)])
    assert e.value.reason == "empty_image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_truncated_image_is_corrupt_even_when_another_library_relaxed_pil(fmt, monkeypatch):
    """lmms-eval and tensorflow-datasets set PIL's process-wide LOAD_TRUNCATED_IMAGES on import,
    under which PIL pads a truncated file silently: training must still skip it."""
    from PIL import ImageFile

    whole = image_bytes(64, 48, fmt=fmt, seed=2)
    cut = whole[: len(whole) // 2]
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with Image.open(io.BytesIO(cut)) as im:
        im.load()  # what PIL alone does now: no error
    with pytest.raises(L.ImageError, match="corrupt_image"):
        L.decode_image(cut)
    assert L.decode_image(whole).size == (64, 48)
