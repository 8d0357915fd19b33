"""Native-resolution preprocessing against transformers' ``Qwen2VLImageProcessor`` configured as
LLaVA-OneVision-1.5's ``preprocessor_config.json``; unprocessable images are counted skips."""

import io

import numpy as np
import pytest
import transformers
from PIL import Image

from allava_jax.data import native
from allava_jax.data.images import ImageError
from allava_jax.data.quality import REASONS
from allava_jax.models import rice

# The release's preprocessor_config.json (LLaVA-OneVision-1.5-4B-Instruct), per the facts page.
RELEASE = dict(temporal_patch_size=1, patch_size=14, merge_size=2, min_pixels=3136, max_pixels=2560000,
               image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
               resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True)

# (W, H): tiny (upscaled to min_pixels), square, panorama, portrait, above max_pixels (scaled
# down), and one whose sides are already multiples of 28 (no resize).
SIZES = [(20, 30), (448, 448), (1500, 170), (300, 1100), (2100, 1400), (56, 84)]


def _image(size, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def reference():
    return transformers.Qwen2VLImageProcessor(**RELEASE)


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_patches_and_grid_equal_qwen2vl_processor(reference, size):
    img = _image(size, seed=size[0])
    want = reference(images=[img], return_tensors="np")
    ours = native.preprocess_native(img)
    assert [1, *ours.grid] == want["image_grid_thw"][0].tolist()
    assert ours.patches.shape == want["pixel_values"].shape and ours.patches.shape[1] == 588
    np.testing.assert_allclose(ours.patches, want["pixel_values"], atol=1e-6, rtol=0)
    assert ours.num_tokens == ours.grid[0] * ours.grid[1] // 4
    h, w = ours.grid[0] * 14, ours.grid[1] * 14
    assert native.smart_resize(size[1], size[0]) == (h, w) and h * w <= RELEASE["max_pixels"]


def test_block_order_of_patches_matches_model_coords():
    """The processor's patch k sits at the model's ``block_coords`` k: patchify a tagged image."""
    gh, gw = 4, 6
    tags = np.arange(gh * gw, dtype=np.float32).reshape(gh, gw)
    image = np.repeat(np.repeat(tags, 14, 0), 14, 1)[..., None].repeat(3, axis=-1)
    patches = native.patchify(image)
    rows, cols = rice.block_coords(gh, gw).T
    np.testing.assert_array_equal(patches[:, 0], tags[rows, cols])


def test_documented_token_counts():
    for side, tokens in ((448, 256), (560, 400), (1792, 4096)):
        h, w = native.smart_resize(side, side, max_pixels=3240000)
        assert h * w // (28 * 28) == tokens


@pytest.mark.parametrize("size,reason", [((6000, 20), "image_aspect_ratio"), ((10, 400), "image_too_small")])
def test_unprocessable_images_are_counted_skips(size, reason):
    buf = io.BytesIO()
    _image(size, 1).save(buf, format="PNG")
    with pytest.raises(ImageError) as err:
        native.load_native(buf.getvalue())
    assert err.value.reason == reason and reason in REASONS
    with pytest.raises(ImageError) as err:
        native.load_native(b"not an image")
    assert err.value.reason == "corrupt_image"


def test_qwen2vl_chat_format_equals_the_authors_text():
    """An ALLaVA record (``<image>\\n`` first) under ``qwen2vl``: the token ids of the authors'
    text (chat template, ``<image>`` replaced in place), loss on the answers and ``<|im_end|>``."""
    import ov15_fixtures as F
    from allava_jax.data import templates

    tok = F.qwen_tokenizer()
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    end = templates.answer_end_id(tok, "qwen2vl")
    assert end == tok.convert_tokens_to_ids("<|im_end|>")
    record = {"conversations": [
        {"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "A cat on a red mat."},
        {"from": "human", "value": "And <image> here?"}, {"from": "gpt", "value": "A dog in the park."}]}
    counts = [6, 4]  # per image: grid_h * grid_w / 4
    ids, assistant, runs = templates.tokenize_parts(
        templates.render(templates.parse_turns(record["conversations"]), "qwen2vl", 2), tok, eos_id=end,
        image_token_id=pad, num_image_tokens=counts)
    text = F.authors_text(tok, [("<image>\nWhat is in the image?", "A cat on a red mat."),
                                ("And <image> here?", "A dog in the park.")], counts)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert ids.tolist() == tok.encode(text, add_special_tokens=False)
    assert [e - s for s, e in runs] == counts and all((ids[s:e] == pad).all() for s, e in runs)
    # Loss: exactly each answer's tokens and its <|im_end|>.
    spans = [tok.encode(a, add_special_tokens=False) + [end] for a in ("A cat on a red mat.", "A dog in the park.")]
    assert ids[assistant].tolist() == spans[0] + spans[1]
    # The generation prompt ends with the assistant header, as the template's add_generation_prompt.
    prompt = templates.render([("<image>\nWhat is in the image?", None)], "qwen2vl", 1)
    p_ids, _, _ = templates.tokenize_parts(prompt, tok, eos_id=end, image_token_id=pad, num_image_tokens=[6])
    assert p_ids.tolist() == tok.encode(F.authors_text(tok, [("<image>\nWhat is in the image?", None)], [6], True),
                                        add_special_tokens=False)
    assert set(templates.stop_ids(tok, "qwen2vl")) == {end, tok.eos_token_id}
