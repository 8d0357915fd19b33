"""The exported directory in transformers: loads with no custom code, same logits, same chat ids."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import test_convert_support as S
from allava_jax import checkpoints
from allava_jax.convert import importer
from allava_jax.convert.exporter import export_checkpoint
from allava_jax.data import images as our_images
from allava_jax.data import templates
from allava_jax.infer import prompts
from allava_jax.models import Llava

QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """CLIP + Phi -> import (fresh projector) -> export, dropping Phi's head bias."""
    tmp = tmp_path_factory.mktemp("hf")
    clip, _ = S.clip_dir(tmp / "clip")
    phi, phi_model = S.phi_dir(tmp / "phi")
    with torch.no_grad():
        phi_model.lm_head.bias.zero_()  # HF Llava has no head bias: make the models comparable
    phi_model.save_pretrained(tmp / "phi")
    importer.import_clip_phi(clip, phi, tmp / "ckpt", seed=3, **QUIET)
    export_checkpoint(tmp / "ckpt", tmp / "out", **QUIET)
    return tmp / "ckpt", tmp / "out"


def _image(seed=0, size=(37, 23)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cat sitting on a red mat."}]},
    {"role": "user", "content": "Describe the picture in detail."},
]


def test_exported_directory_loads_and_logits_match_jax(exported):
    ckpt, out = exported
    model = transformers.LlavaForConditionalGeneration.from_pretrained(out, trust_remote_code=False).eval()
    processor = transformers.AutoProcessor.from_pretrained(out, trust_remote_code=False)
    assert type(processor).__name__ == "LlavaProcessor"
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == processor.tokenizer.eos_token_id == 0
    # Nothing left at HF's random init: the loaded weights are exactly the checkpoint's.
    params = checkpoints.load_params(ckpt)
    np.testing.assert_array_equal(model.model.multi_modal_projector.linear_1.weight.detach().numpy(),
                                  np.asarray(params["projector"]["linear_1"]["kernel"]).T)
    np.testing.assert_array_equal(model.model.vision_tower.post_layernorm.weight.detach().numpy(),
                                  np.asarray(params["vision"]["post_layernorm"]["scale"]))

    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    inputs = processor(text=text, images=[_image()], return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits.numpy()
    config = checkpoints.load_config(ckpt)
    ids = inputs["input_ids"].numpy()
    assert (ids == config.image_token_id).sum() == config.num_image_tokens
    pixels = inputs["pixel_values"].numpy().transpose(0, 2, 3, 1)
    # The processor pads to square with the CLIP mean and resizes as our data pipeline does.
    ours_pixels = our_images.normalize(our_images.preprocess_pil(_image(), config.vision.image_size))
    np.testing.assert_allclose(pixels[0], ours_pixels, atol=1e-5)
    logits = Llava(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(pixels)[None], jnp.ones((1, 1), bool))
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


def test_chat_template_gives_our_training_ids(exported):
    ckpt, out = exported
    processor = transformers.AutoProcessor.from_pretrained(out)
    tok = processor.tokenizer
    config = checkpoints.load_config(ckpt)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id == config.image_token_id

    def ours(rounds, num_images):
        parts = templates.render(rounds, "allava", num_images)
        ids, _, _ = templates.tokenize_parts(parts, tok, eos_id=tok.eos_token_id, image_token_id=image_id,
                                             num_image_tokens=config.num_image_tokens)
        return ids.tolist()

    def theirs(messages, images):
        text = processor.apply_chat_template(messages)
        return processor(text=text, images=images or None, return_tensors="np")["input_ids"][0].tolist()

    two_rounds = MESSAGES + [{"role": "assistant", "content": "There is a dog running in the park."}]
    rounds = [("<image>\nWhat is in the image?", "A cat sitting on a red mat."),
              ("Describe the picture in detail.", "There is a dog running in the park.")]
    got = theirs(two_rounds, [_image()])
    assert got == ours(rounds, 1)
    assert got.count(tok.eos_token_id) == 2 and got[0] != tok.eos_token_id  # EOS per answer, no BOS
    # Text-only, string content.
    text_only = [{"role": "user", "content": "the quick brown fox"}, {"role": "assistant", "content": "jumps over"}]
    assert theirs(text_only, []) == ours([("the quick brown fox", "jumps over")], 0)
    # Generation prompt: everything up to the answer, nothing more. The space before the answer
    # belongs to the answer's first token in training (byte-level BPE: " A"), so it is not here.
    prompt = processor.apply_chat_template(MESSAGES[:1], add_generation_prompt=True)
    assert prompt == "[INST] <image>\nWhat is in the image? [/INST]"
    generation = processor(text=prompt, images=[_image()], return_tensors="np")["input_ids"][0].tolist()
    assert generation == prompts.encode_generation_prompt(
        tok, [("<image>\nWhat is in the image?", None)], 1, image_token_id=image_id,
        num_image_tokens=config.num_image_tokens,
    )
    with pytest.raises(Exception, match="only user and assistant"):
        processor.apply_chat_template([{"role": "system", "content": "be brief"}] + MESSAGES[:1])
