"""Generation prompts in the model's chat template, built from ``allava_jax.data.templates``.

A generation prompt is the training tokenization of the conversation without its open answer,
so ids at inference equal ids in training up to the answer, and, as in ALLaVA's own inference code,
an ``allava`` prompt ends with the token of the space after ``[/INST]``.
"""

from __future__ import annotations

from typing import Any, Sequence

from allava_jax.data import templates
from allava_jax.errors import UserError

IMAGE_PLACEHOLDER = templates.IMAGE_PLACEHOLDER
Turn = tuple[str, str | None]  # (user text, assistant answer or None for the open last turn)


class PromptError(UserError):
    """The conversation cannot be rendered (bad turn order, image count mismatch...)."""


def render_generation_prompt(rounds: Sequence[Turn], num_images: int, template: str = "allava") -> list[templates.Part]:
    """Template parts of ``rounds``, whose last turn is the open one (answer ``None``)."""
    if not rounds or rounds[-1][1] is not None:
        raise PromptError("the conversation must end with a user turn")
    if any(answer is None for _, answer in rounds[:-1]):
        raise PromptError("only the last turn may lack an answer")
    try:
        return templates.render(list(rounds), template, num_images)
    except templates.SampleError as e:
        raise PromptError(str(e)) from None


def encode_generation_prompt(
    tokenizer: Any, rounds: Sequence[Turn], num_images: int, *, image_token_id: int,
    num_image_tokens: int | Sequence[int], template: str = "allava",
) -> list[int]:
    """Token ids of the generation prompt (each image = ``num_image_tokens`` placeholder ids, or
    its own count from a sequence)."""
    ids, _, _ = templates.tokenize_parts(
        render_generation_prompt(rounds, num_images, template),
        tokenizer,
        eos_id=templates.answer_end_id(tokenizer, template),
        image_token_id=image_token_id,
        num_image_tokens=num_image_tokens,
    )
    return ids.tolist()


def single_turn(question: str, num_images: int) -> list[Turn]:
    """One user turn; images go first as ``<image>\\n`` (the template moves a single one there)."""
    if num_images and IMAGE_PLACEHOLDER not in question:
        question = (IMAGE_PLACEHOLDER + "\n") * num_images + question
    return [(question, None)]
