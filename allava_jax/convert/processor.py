"""The Hugging Face side artefacts of an export: tokenizer with ``<image>``, processor, chat template.

The chat template renders the text that ``allava_jax.data.templates`` renders for training with
the model's template (no system prompt, no BOS; for ``allava`` ``[INST] {text.strip()} [/INST] ``
then ``{answer}<|endoftext|>``; images first as ``<image>\\n``). A chat template renders one string,
tokenized in one go, so its ids equal the training ids (each turn tokenized on its own) for a
single-turn generation prompt, which ends with the space after ``[/INST]`` as ALLaVA's inference
code does; for a multi-turn history a byte-level BPE may merge that space into the answer's first
token (`` The``) where training has two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from allava_jax.convert.errors import ConvertError
from allava_jax.data.images import CLIP_MEAN, CLIP_STD
from allava_jax.data.templates import CHAT_FORMATS, IMAGE_PLACEHOLDER, answer_end_id, stop_ids
from allava_jax.data.tokenizer import load_tokenizer
from allava_jax.models.config import LlavaConfig


def chat_template_jinja(template: str) -> str:
    """Jinja for ``LlavaProcessor.chat_template`` rendering ``templates.render``'s text of ``template``.

    Content may be a string (may already hold <image>) or a list of {"type": "image"} /
    {"type": "text", "text": ...} parts; images go first, each as "<image>\\n" before the stripped
    text, as `templates.render` places one image; then the turn is stripped as a whole, as it
    strips each human turn. A user turn already ends with the assistant's header (``[/INST] ``,
    ``<|assistant|>\\n``), so ``add_generation_prompt`` adds nothing.
    """
    fmt = CHAT_FORMATS[template]
    before, after = fmt.user.split("{text}")
    end = "eos_token" if fmt.answer_end is None else json.dumps(fmt.answer_end)
    between = f"{{%- if not loop.first -%}}{{{{- {json.dumps(fmt.between_rounds)} -}}}}{{%- endif -%}}" if fmt.between_rounds else ""
    return (
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
        "{%- else -%}"
        "{%- set ns = namespace(images='', text='') -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{%- set ns.images = ns.images + '" + IMAGE_PLACEHOLDER + "\\n' -%}"
        "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set text = ns.images + ((ns.text | trim) if ns.images else ns.text) -%}"
        "{%- endif -%}"
        "{%- if message['role'] == 'user' -%}" + between
        + f"{{{{- {json.dumps(before)} + (text | trim) + {json.dumps(after)} -}}}}"
        "{%- elif message['role'] == 'assistant' -%}" + f"{{{{- text + {end} -}}}}"
        "{%- else -%}{{- raise_exception('the " + template + " template has only user and assistant turns, got ' + message['role']) -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def ensure_image_token(tokenizer: Any, vocab_size: int) -> tuple[int, bool]:
    """(id of ``<image>``, whether it was added). The id must lie inside the embedding table:
    transformers' Llava looks every input id up before replacing the image ones."""
    added = IMAGE_PLACEHOLDER not in tokenizer.get_vocab()
    if added:
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if not 0 <= image_id < vocab_size:
        raise ConvertError(
            f"the tokenizer's {IMAGE_PLACEHOLDER} id {image_id} is outside the model's vocabulary "
            f"(vocab_size={vocab_size}); the embedding table has no row for it"
        )
    return image_id, added


def tokenizer_for(directory: str | Path, config: LlavaConfig, notes: list[str]) -> tuple[LlavaConfig, Any]:
    """The tokenizer at ``directory`` with ``<image>`` added if missing, and the config whose
    ``image_token_id`` is that token's id; what changed is appended to ``notes``."""
    tokenizer = load_tokenizer(directory)
    image_id, added = ensure_image_token(tokenizer, config.text.vocab_size)
    if added:
        notes.append(f"added '<image>' to the tokenizer from {directory} as id {image_id}")
    if image_id != config.image_token_id:
        notes.append(f"image_token_id = the tokenizer's '<image>' id {image_id} (config said {config.image_token_id})")
    answer_end_id(tokenizer, config.chat_template)  # the template's end token must be one token
    return config.replace(image_token_id=image_id), tokenizer


IMAGE_PAD = "<|image_pad|>"  # Qwen2-VL's image placeholder (LLaVA-OneVision-1.5)


def ov15_tokenizer(directory: str | Path, config: LlavaConfig, notes: list[str]) -> Any:
    """A LLaVA-OneVision-1.5 (Qwen2) tokenizer: ``<|image_pad|>`` must be one token with the
    config's ``image_token_id``, and the ``qwen2vl`` template's tokens must be there."""
    tokenizer = load_tokenizer(directory)
    ids = tokenizer.encode(IMAGE_PAD, add_special_tokens=False)
    if ids != [config.image_token_id]:
        raise ConvertError(f"{directory}: the tokenizer encodes {IMAGE_PAD} as {ids}; config.json's image_token_id "
                           f"is {config.image_token_id}")
    answer_end_id(tokenizer, config.chat_template)
    notes.append(f"tokenizer from {directory} ({IMAGE_PAD} = {config.image_token_id})")
    return tokenizer


def image_processor(config: LlavaConfig) -> Any:
    """CLIP preprocessing plus LLaVA's pad-to-square with the mean colour (``do_pad``), as ALLaVA
    trained (``expand2square``); a plain ``CLIPImageProcessor`` would centre-crop instead."""
    from transformers.models.llava.image_processing_pil_llava import (
        LlavaImageProcessorPil,
    )

    size = config.vision.image_size
    return LlavaImageProcessorPil(
        do_pad=True,
        do_resize=True,
        size={"shortest_edge": size},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


def build_processor(config: LlavaConfig, tokenizer: Any) -> Any:
    """``LlavaProcessor`` that expands ``<image>`` to ``num_image_tokens`` and has the model's template."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor(config),
        tokenizer=tokenizer,
        patch_size=config.vision.patch_size,
        vision_feature_select_strategy=config.vision.select_strategy,
        chat_template=chat_template_jinja(config.chat_template),
        image_token=IMAGE_PLACEHOLDER,
        num_additional_image_tokens=1,  # CLIP's CLS token; "default" drops it again
    )


def write_generation_config(out: str | Path, tokenizer: Any, template: str) -> None:
    """``generation_config.json``: stop where our engine stops (``<|endoftext|>`` for Phi-2; Phi-3's
    ``<|end|>`` and ``<|endoftext|>``)."""
    from transformers import GenerationConfig

    if tokenizer.eos_token_id is None:
        raise ConvertError("the tokenizer has no eos_token; generation would never stop")
    ids = stop_ids(tokenizer, template)
    eos = tokenizer.eos_token_id
    GenerationConfig(eos_token_id=ids[0] if len(ids) == 1 else list(ids),
                     pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                     bos_token_id=tokenizer.bos_token_id).save_pretrained(str(out))
