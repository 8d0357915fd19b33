"""Generation prompts in the ALLaVA chat template, built from ``allava_jax.data.templates``.

A generation prompt is the training tokenization of the conversation cut just before the last
answer's first token, so ids at inference equal ids in training up to the answer. The template
gives the space after ``[/INST]`` to the answer (byte-level BPE merges it into the first answer
token, " The"), so the prompt ends at ``[/INST]``; the generated leading space is dropped on
decode.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from allava_jax.data import templates

IMAGE_PLACEHOLDER = templates.IMAGE_PLACEHOLDER
Turn = tuple[str, str | None]  # (user text, assistant answer or None for the open last turn)


class PromptError(ValueError):
    """The conversation cannot be rendered (bad turn order, image count mismatch...)."""


# Stands in for the open answer while tokenizing (only the tokens before it are kept).
_ANSWER_PROBE = "Answer"


def render_generation_prompt(rounds: Sequence[Turn], num_images: int) -> list[templates.Part]:
    """Template parts of ``rounds`` with the open last answer filled by a probe word."""
    if not rounds or rounds[-1][1] is not None:
        raise PromptError("the conversation must end with a user turn")
    if any(answer is None for _, answer in rounds[:-1]):
        raise PromptError("only the last turn may lack an answer")
    filled = [(user, answer if answer is not None else _ANSWER_PROBE) for user, answer in rounds]
    try:
        return templates.render(filled, "allava", num_images)
    except templates.SampleError as e:
        raise PromptError(str(e)) from None


def encode_generation_prompt(
    tokenizer: Any, rounds: Sequence[Turn], num_images: int, *, image_token_id: int, num_image_tokens: int
) -> list[int]:
    """Token ids of the generation prompt (each image = ``num_image_tokens`` placeholder ids)."""
    parts = render_generation_prompt(rounds, num_images)
    ids, assistant, _ = templates.tokenize_parts(
        parts,
        tokenizer,
        eos_id=tokenizer.eos_token_id,
        image_token_id=image_token_id,
        num_image_tokens=num_image_tokens,
    )
    # The open answer (" " + probe + EOS) is the trailing run of assistant tokens: cut where it starts.
    first_answer = len(ids)
    while first_answer > 0 and assistant[first_answer - 1]:
        first_answer -= 1
    return np.asarray(ids[:first_answer]).tolist()


def single_turn(question: str, num_images: int) -> list[Turn]:
    """One user turn; images go first as ``<image>\\n`` (the template moves a single one there)."""
    if num_images and IMAGE_PLACEHOLDER not in question:
        question = (IMAGE_PLACEHOLDER + "\n") * num_images + question
    return [(question, None)]
