"""Generation prompts in the ALLaVA chat template, built from ``allava_jax.data.templates``.

A generation prompt is the training rendering of the conversation with the last assistant turn
left open: ``[INST] <image>\\n{question} [/INST] `` (no BOS, no system prompt), so ids at
inference equal ids in training up to the answer.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from allava_jax.data import templates

IMAGE_PLACEHOLDER = templates.IMAGE_PLACEHOLDER
Turn = tuple[str, str | None]  # (user text, assistant answer or None for the open last turn)


class PromptError(ValueError):
    """The conversation cannot be rendered (bad turn order, image count mismatch...)."""


def render_generation_prompt(rounds: Sequence[Turn], num_images: int) -> list[templates.Part]:
    """Template parts of ``rounds`` whose last answer is None, ending after ``[/INST] ``."""
    if not rounds or rounds[-1][1] is not None:
        raise PromptError("the conversation must end with a user turn")
    if any(answer is None for _, answer in rounds[:-1]):
        raise PromptError("only the last turn may lack an answer")
    filled = [(user, answer if answer is not None else "") for user, answer in rounds]
    try:
        parts = templates.render(filled, "allava", num_images)
    except templates.SampleError as e:
        raise PromptError(str(e)) from None
    # render() closes the last round with the (empty) answer text and EOS: drop both.
    assert parts[-1].kind == "eos" and parts[-2].kind == "text" and not parts[-2].text
    return parts[:-2]


def encode_generation_prompt(
    tokenizer: Any, rounds: Sequence[Turn], num_images: int, *, image_token_id: int, num_image_tokens: int
) -> list[int]:
    """Token ids of the generation prompt (each image = ``num_image_tokens`` placeholder ids)."""
    parts = render_generation_prompt(rounds, num_images)
    ids, _, _ = templates.tokenize_parts(
        parts,
        tokenizer,
        eos_id=tokenizer.eos_token_id,
        image_token_id=image_token_id,
        num_image_tokens=num_image_tokens,
    )
    return np.asarray(ids).tolist()


def single_turn(question: str, num_images: int) -> list[Turn]:
    """One user turn; images go first as ``<image>\\n`` (the template moves a single one there)."""
    if num_images and IMAGE_PLACEHOLDER not in question:
        question = (IMAGE_PLACEHOLDER + "\n") * num_images + question
    return [(question, None)]
