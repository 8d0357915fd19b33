"""The exported directory in transformers: loads with no custom code, same logits, same chat ids."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import test_convert_support as S
from data_fixtures import expand_reference_images, reference_allava_ids
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
    importer.import_clip_lm(clip, phi, tmp / "ckpt", seed=3, **QUIET)
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


def test_chat_template_renders_our_template_and_reference_prompt_ids(exported):
    ckpt, out = exported
    processor = transformers.AutoProcessor.from_pretrained(out)
    tok = processor.tokenizer
    config = checkpoints.load_config(ckpt)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id == config.image_token_id
    n = config.num_image_tokens

    def our_text(rounds, num_images):
        parts = templates.render(rounds, "allava", num_images)
        return "".join({"image": "<image>", "eos": tok.eos_token}.get(p.kind, p.text) for p in parts)

    # A chat template renders one string: it equals the text of our template, turn for turn.
    two_rounds = MESSAGES + [{"role": "assistant", "content": "There is a dog running in the park."}]
    rounds = [("<image>\nWhat is in the image?", "A cat sitting on a red mat."),
              ("Describe the picture in detail.", "There is a dog running in the park.")]
    assert processor.apply_chat_template(two_rounds) == our_text(rounds, 1)
    text_only = [{"role": "user", "content": " the quick brown fox "}, {"role": "assistant", "content": "jumps over"}]
    assert processor.apply_chat_template(text_only) == our_text([(" the quick brown fox ", "jumps over")], 0)
    # Generation prompt: exactly ALLaVA's inference ids (cli.py, rebuilt), ending with the space.
    prompt = processor.apply_chat_template(MESSAGES[:1], add_generation_prompt=True)
    assert prompt == "[INST] <image>\nWhat is in the image? [/INST] "
    generation = processor(text=prompt, images=[_image()], return_tensors="np")["input_ids"][0].tolist()
    convs = [{"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": None}]
    reference, _ = expand_reference_images(*reference_allava_ids(tok, convs), image_id, n)
    assert generation == reference and tok.convert_ids_to_tokens(reference[-1]) == "Ġ"
    assert generation == prompts.encode_generation_prompt(
        tok, [("<image>\nWhat is in the image?", None)], 1, image_token_id=image_id, num_image_tokens=n)
    with pytest.raises(Exception, match="only user and assistant"):
        processor.apply_chat_template([{"role": "system", "content": "be brief"}] + MESSAGES[:1])


def _reference_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """ALLaVA's image procedure (cli.py ``get_image_tensors``), rebuilt: ``expand2square`` with the
    CLIP mean colour, then the CLIP tower's own processor (shortest edge, centre crop, normalise)."""
    processor = transformers.models.clip.image_processing_pil_clip.CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    w, h = image.size
    square = Image.new(image.mode, (max(w, h),) * 2, tuple(int(x * 255) for x in processor.image_mean))
    square.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return processor.preprocess(square, return_tensors="pt")["pixel_values"]


def test_generate_cli_on_imported_hf_llava_equals_reference_generate(tmp_path):
    """`python -m allava_jax.generate` on an imported HF Llava gives the text that transformers'
    `generate` gives from ALLaVA's own prompt ids and pixels (its cli.py procedure, rebuilt)."""
    src, model = S.llava_dir(tmp_path / "hf", seed=5)
    importer.import_llava(src, tmp_path / "ckpt", **QUIET)
    tok = transformers.AutoTokenizer.from_pretrained(src)
    vision = model.config.vision_config
    image_id, n = model.config.image_token_index, (vision.image_size // vision.patch_size) ** 2
    question, image = "Describe the picture in detail.", _image(4, size=(41, 29))
    image.save(tmp_path / "q.png")
    convs = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": None}]
    ids, _ = expand_reference_images(*reference_allava_ids(tok, convs), image_id, n)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pixel_values=_reference_pixels(image, vision.image_size),
            do_sample=False, max_new_tokens=20, min_new_tokens=1, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id,
            # The original tokenizer has no <image> token (the reference marks images with -200), so
            # the reference model cannot emit one; the exported vocabulary has it, and we never sample it.
            suppress_tokens=[image_id],
        )
    expected = tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    assert len(set(out[0, len(ids):].tolist())) > 2 and expected
    assert S.generate_cli(tmp_path / "ckpt", tmp_path / "q.png", question, 20) == expected + "\n"
