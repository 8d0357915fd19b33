"""Chat templates: record conversations -> token ids, next-token targets and loss mask.

Templates (no system prompt, no BOS):

* ``allava`` (Phi-2, StableLM-2, Qwen2): per round ``[INST] {human.strip()} [/INST] `` (trailing
  space included), then ``{gpt}`` + EOS; the image goes first in the first human turn as
  ``<image>\\n``. Loss on the answer and its EOS only.
* ``phi3`` (Phi-3's own chat format): per round ``<|user|>\\n{human.strip()}<|end|>\\n<|assistant|>\\n``,
  then ``{gpt}<|end|>``, and ``\\n`` before the next round's ``<|user|>``; loss on the answer and its
  ``<|end|>``. Generation stops at any of ``<|end|>``, ``<|endoftext|>`` and the tokenizer's EOS.
* ``qwen2vl`` (Qwen2-VL's chat format, LLaVA-OneVision-1.5): the default system turn
  ``<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n``, per round
  ``<|im_start|>user\n{human.strip()}<|im_end|>\n<|im_start|>assistant\n``, then ``{gpt}<|im_end|>``
  and ``\n`` before the next round; an image is ``<|vision_start|>`` + its ``<|image_pad|>`` tokens
  (one per merged 2 x 2 block: ``grid_h * grid_w / 4``, per image) + ``<|vision_end|>``, in place
  of its ``<image>`` (so ALLaVA/LLaVA's ``<image>\n`` keeps its newline). Loss on the answer and its
  ``<|im_end|>``; generation also stops at ``<|endoftext|>``.
* ``plain`` (LLaVA pretraining): the images, then the (last) assistant text + EOS; loss on the
  caption and its EOS.

A model names its conversation template in ``LlavaConfig.chat_template``; a data source whose
``template`` is ``chat`` (the default) takes the model's.

Tokenization is ALLaVA's own (``allava/serve/cli.py``, ``preprocess_allava``): every human turn and
every answer is tokenized on its own (``add_special_tokens=False``), a human turn in chunks split
at ``<image>``, and the ids are concatenated. So a training sample reads ``]``, `` ``, ``The``
where one-string tokenization would read ``]``, `` The``, and a generation prompt (the human turns
and earlier answers, without the open answer) ends with the token of the space after ``[/INST]``.

Image placeholder contract (the model relies on it): every ``<image>`` becomes ``num_image_tokens``
copies of ``image_token_id`` (a count per image for native-resolution models), images in
placeholder order, as HF Llava does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from allava_jax.errors import UserError

IMAGE_PLACEHOLDER = "<image>"


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """How a conversation template frames the turns (all the text around them is masked)."""

    user: str  # one human turn; ``{text}`` is the stripped human text
    answer_end: str | None = None  # the token that ends an answer; None: the tokenizer's EOS
    between_rounds: str = ""  # after an answer's end, before the next human turn
    stop_tokens: tuple[str, ...] = ()  # more tokens that end generation, besides answer_end and EOS
    system: str = ""  # text before the first human turn (a default system turn), masked
    image_open: str = ""  # masked text right before each image's placeholder tokens
    image_close: str = ""  # and right after them


CHAT_FORMATS: dict[str, ChatFormat] = {
    "allava": ChatFormat(user="[INST] {text} [/INST] "),
    "phi3": ChatFormat(user="<|user|>\n{text}<|end|>\n<|assistant|>\n", answer_end="<|end|>",
                       between_rounds="\n", stop_tokens=("<|endoftext|>",)),
    "qwen2vl": ChatFormat(user="<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", answer_end="<|im_end|>",
                          between_rounds="\n", stop_tokens=("<|endoftext|>",),
                          system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
                          image_open="<|vision_start|>", image_close="<|vision_end|>"),
}
CHAT_TEMPLATES = tuple(CHAT_FORMATS)
TEMPLATES = (*CHAT_TEMPLATES, "plain")
_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant")


class SampleError(Exception):
    """A record that must be skipped; `reason` is a key of `quality.REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Part:
    """One piece of a rendered conversation: text (with loss flag), an image, or EOS."""

    kind: str  # "text" | "image" | "eos"
    text: str = ""
    loss: bool = False


def parse_turns(conversations: Any) -> list[tuple[str, str]]:
    """Validates conversations into (human, gpt) rounds; raises SampleError."""
    if not isinstance(conversations, list) or not conversations:
        raise SampleError("bad_turns", "conversations missing or empty")
    if len(conversations) % 2:
        raise SampleError("bad_turns", f"odd number of turns ({len(conversations)})")
    rounds = []
    for i in range(0, len(conversations), 2):
        h, g = conversations[i], conversations[i + 1]
        if not (isinstance(h, dict) and isinstance(g, dict)):
            raise SampleError("bad_turns", f"turn {i} is not an object")
        if h.get("from") not in _HUMAN or g.get("from") not in _GPT:
            raise SampleError("bad_turns", f"turns {i},{i + 1} are {h.get('from')!r},{g.get('from')!r}")
        hv, gv = h.get("value"), g.get("value")
        if not isinstance(hv, str) or not isinstance(gv, str):
            raise SampleError("bad_turns", f"turn {i} has a non-string value")
        if not gv.strip():
            raise SampleError("empty_answer", f"answer of round {i // 2} is empty")
        rounds.append((hv, gv))
    return rounds


def _split_images(text: str, loss: bool, fmt: ChatFormat | None = None) -> list[Part]:
    parts: list[Part] = []
    for j, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if j:
            if fmt is not None and fmt.image_open:
                parts.append(Part("text", fmt.image_open, False))
            parts.append(Part("image"))
            if fmt is not None and fmt.image_close:
                parts.append(Part("text", fmt.image_close, False))
        if chunk:
            parts.append(Part("text", chunk, loss))
    return parts


def render(rounds: list[tuple[str, str | None]], template: str, num_images: int) -> list[Part]:
    """Renders validated rounds into Parts; checks the placeholder count against `num_images`.

    The last answer may be ``None``: the parts then end with the last human turn (a generation
    prompt, ``allava`` template only).
    """
    n_placeholders = sum(h.count(IMAGE_PLACEHOLDER) for h, _ in rounds)
    if any(g and IMAGE_PLACEHOLDER in g for _, g in rounds) or n_placeholders != num_images:
        raise SampleError(
            "image_count_mismatch", f"{n_placeholders} <image> placeholders, {num_images} images"
        )
    if template == "plain":
        if rounds[-1][1] is None:
            raise ValueError("the plain template has no generation prompt")
        parts = [Part("image")] * num_images
        return parts + [Part("text", rounds[-1][1], True), Part("eos", loss=True)]
    if template not in CHAT_FORMATS:
        raise UserError(f"unknown template {template!r}; choose from {TEMPLATES}")
    fmt = CHAT_FORMATS[template]
    rounds = list(rounds)
    if num_images == 1:
        # LLaVA convention: a single image moves to the start of the first turn as "<image>\n".
        first = rounds[0][0].replace(IMAGE_PLACEHOLDER, "").strip()
        rounds[0] = (IMAGE_PLACEHOLDER + "\n" + first, rounds[0][1])
    parts: list[Part] = [Part("text", fmt.system, False)] if fmt.system else []
    for i, (human, gpt) in enumerate(rounds):
        if i and fmt.between_rounds:
            parts.append(Part("text", fmt.between_rounds, False))
        parts += _split_images(fmt.user.format(text=human.strip()), False, fmt)
        if gpt is not None:
            parts += [Part("text", gpt, True), Part("eos", loss=True)]
    return parts


def _token_id(tokenizer: Any, token: str, template: str) -> int:
    """The id of a template's single special token; a clear error when the vocabulary lacks it."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise UserError(f"the {template!r} template needs {token!r} as one token of the tokenizer, "
                        f"which encodes it as {len(ids)} tokens; use that model's tokenizer or another template")
    return int(ids[0])


def answer_end_id(tokenizer: Any, template: str) -> int:
    """The token a template ends each answer with (the ``eos`` part): EOS or the format's own."""
    fmt = CHAT_FORMATS.get(template)
    if fmt is None or fmt.answer_end is None:
        if tokenizer.eos_token_id is None:
            raise UserError("tokenizer has no eos_token_id (ALLaVA ends answers with <|endoftext|>)")
        return int(tokenizer.eos_token_id)
    return _token_id(tokenizer, fmt.answer_end, template)


def stop_ids(tokenizer: Any, template: str) -> tuple[int, ...]:
    """Every token that ends generation under ``template``: its answer end first, then EOS and
    the format's other stop tokens that the vocabulary has."""
    ids = [answer_end_id(tokenizer, template)]
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for token in CHAT_FORMATS[template].stop_tokens:
        if len(found := tokenizer.encode(token, add_special_tokens=False)) == 1:
            ids.append(int(found[0]))
    return tuple(dict.fromkeys(ids))


def _backend(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` behind a fast HF tokenizer (5-10x cheaper per call)."""
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def tokenize_parts(
    parts: list[Part],
    tokenizer: Any,
    *,
    eos_id: int,
    image_token_id: int,
    num_image_tokens: int | Sequence[int],
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Parts -> (ids int32 [T], is_assistant bool [T], image runs [(start, end)]).

    ``eos_id`` is the id of every ``eos`` part: the template's ``answer_end_id``.
    ``num_image_tokens``: one count for every image, or each image's own (native resolution).

    Each text part is tokenized on its own, as the reference does per turn and per image chunk.
    """
    backend = _backend(tokenizer)
    ids: list[int] = []
    assistant: list[bool] = []
    runs: list[tuple[int, int]] = []
    for part in parts:
        if part.kind == "image":
            n = num_image_tokens if isinstance(num_image_tokens, int) else int(num_image_tokens[len(runs)])
            runs.append((len(ids), len(ids) + n))
            piece = [image_token_id] * n
        elif part.kind == "eos":
            piece = [eos_id]
        else:
            piece = backend.encode(part.text, add_special_tokens=False).ids
        ids += piece
        assistant += [part.loss] * len(piece)
    return np.asarray(ids, np.int32), np.asarray(assistant, bool), runs


def build_example(
    ids: np.ndarray,
    assistant: np.ndarray,
    runs: list[tuple[int, int]],
    *,
    seq_len: int,
    truncate: bool = True,
) -> dict[str, np.ndarray]:
    """Shifts into next-token targets + loss mask and truncates without cutting an image run.

    loss_mask[t] is true when targets[t] = ids[t + 1] is an assistant token; the last token of the
    sample never has loss (no next token in-segment).
    """
    if len(ids) > seq_len:
        if not truncate or any(end > seq_len for _, end in runs):
            raise SampleError("too_long", f"{len(ids)} tokens > seq_len {seq_len}")
        ids, assistant = ids[:seq_len], assistant[:seq_len]
    targets = np.zeros_like(ids)
    targets[:-1] = ids[1:]
    loss_mask = np.zeros_like(assistant)
    loss_mask[:-1] = assistant[1:]
    if not loss_mask.any():
        raise SampleError("too_long" if len(ids) == seq_len else "empty_answer", "no loss tokens")
    return {"tokens": ids, "targets": targets, "loss_mask": loss_mask}


def encode_record(
    record: dict[str, Any],
    tokenizer: Any,
    *,
    template: str,
    num_images: int,
    seq_len: int,
    eos_id: int,
    image_token_id: int,
    num_image_tokens: int | Sequence[int],
    truncate: bool = True,
) -> dict[str, np.ndarray]:
    """A parsed record -> {tokens, targets, loss_mask} (each [T] with T <= seq_len)."""
    rounds = parse_turns(record.get("conversations"))
    parts = render(rounds, template, num_images)
    ids, assistant, runs = tokenize_parts(
        parts, tokenizer, eos_id=eos_id, image_token_id=image_token_id,
        num_image_tokens=num_image_tokens,
    )
    return build_example(ids, assistant, runs, seq_len=seq_len, truncate=truncate)


def image_paths(record: dict[str, Any]) -> list[str]:
    """The record's image paths: `image` may be absent, a string or a list."""
    image = record.get("image")
    if image is None or image == "":
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list):
        return image
    raise SampleError("image_count_mismatch", f"image field has type {type(image).__name__}")
