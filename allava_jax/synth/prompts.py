"""Prompt templates (files the user can override) and the per-item choices they need.

Templates live in ``allava_jax/synth/prompts/*.txt``; ``--prompts DIR`` replaces any of them by
name. Placeholders are ``{question_number}``, ``{instruction}`` and ``{question}``, substituted by
plain replacement so templates need no brace escaping. An override must keep the output tags the
parser expects (``<caption>``, ``<questions>``, ``<answer>``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DIR = Path(__file__).parent / "prompts"
NAMES = ("system", "laion", "vflan", "text", "caption_instructions")
REQUIRED_TAGS = {"laion": ("caption", "questions", "answer"), "vflan": ("caption", "answer"), "text": ("answer",)}


@dataclass(frozen=True)
class Prompts:
    """The loaded templates; ``caption_instructions`` are the human turns of Caption records."""

    system: str
    laion: str
    vflan: str
    text: str
    caption_instructions: tuple[str, ...]

    def template(self, mode: str) -> str:
        return getattr(self, mode)


def load_prompts(override_dir: str | Path | None = None) -> Prompts:
    """Load the default templates, replacing each one present in ``override_dir``."""
    texts = {}
    for name in NAMES:
        path = DEFAULT_DIR / f"{name}.txt"
        if override_dir is not None and (Path(override_dir) / f"{name}.txt").exists():
            path = Path(override_dir) / f"{name}.txt"
        texts[name] = path.read_text(encoding="utf-8").strip()
    for mode, tags in REQUIRED_TAGS.items():
        for tag in tags:
            if f"<{tag}>" not in texts[mode] or f"</{tag}>" not in texts[mode]:
                raise ValueError(f"prompt template {mode!r} must show the <{tag}>...</{tag}> format")
    instructions = tuple(ln.strip() for ln in texts.pop("caption_instructions").splitlines() if ln.strip())
    if not instructions:
        raise ValueError("caption_instructions.txt holds no instruction")
    return Prompts(caption_instructions=instructions, **texts)


def item_rng(seed: int, item_id: str, what: str) -> random.Random:
    """A generator fixed by (seed, item, purpose): resumed, batch and online runs choose alike."""
    return random.Random(f"{seed}:{what}:{item_id}")


def question_number(seed: int, item_id: str) -> int:
    """Which of the five candidate questions gets answered (1-based), chosen at random per item."""
    return item_rng(seed, item_id, "question").randint(1, 5)


def caption_instruction(prompts: Prompts, seed: int, item_id: str) -> str:
    """The human turn of the item's Caption record, drawn at random from the instruction list."""
    return item_rng(seed, item_id, "caption").choice(prompts.caption_instructions)


def user_text(prompts: Prompts, mode: str, *, item_id: str, seed: int, instruction: str | None = None) -> str:
    """The text part of the user message for one item."""
    text = prompts.template(mode)
    if mode == "laion":
        text = text.replace("{question_number}", str(question_number(seed, item_id)))
    elif mode == "vflan":
        text = text.replace("{instruction}", instruction or "")
    else:
        text = text.replace("{question}", instruction or "")
    return text


def build_messages(system: str, text: str, image_url: str | None, detail: str = "auto") -> list[dict]:
    """Chat messages: system prompt, then the user turn with the image (if any) before the text."""
    content: list[dict] | str
    if image_url is None:
        content = text
    else:
        content = [{"type": "image_url", "image_url": {"url": image_url, "detail": detail}},
                   {"type": "text", "text": text}]
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]
