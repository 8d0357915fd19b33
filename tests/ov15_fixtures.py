"""Shared builders for the LLaVA-OneVision-1.5 tests (no tests here): a tiny tokenizer with
Qwen2-VL's special tokens and the Qwen2-VL chat template, rebuilt from the facts page."""

from __future__ import annotations

import transformers

import test_convert_support as S

QWEN_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")

# Qwen2-VL's chat template (its hub chat_template): a default system turn, each turn
# <|im_start|>{role}\n{content}<|im_end|>\n, an image as <|vision_start|><|image_pad|><|vision_end|>.
QWEN2VL_JINJA = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The tiny BPE of the convert tests with Qwen2-VL's special tokens and chat template."""
    tok = S.tokenizer(special=QWEN_TOKENS)
    tok.chat_template = QWEN2VL_JINJA
    return tok


def authors_text(tok, rounds: list[tuple[str, str]], image_tokens: list[int], generation: bool = False) -> str:
    """The authors' SFT text: the chat template over the turns, each ``<image>`` replaced in place
    by ``<|vision_start|>`` + its ``<|image_pad|>`` run + ``<|vision_end|>``, the final newline
    dropped (``qwen2vl_task_encoder``)."""
    messages = []
    for human, gpt in rounds:
        messages.append({"role": "user", "content": human})
        if gpt is not None:
            messages.append({"role": "assistant", "content": gpt})
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    pieces = text.split("<image>")
    out = pieces[0]
    for n, piece in zip(image_tokens, pieces[1:], strict=True):
        out += "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>" + piece
    return out if generation else out.removesuffix("\n")
