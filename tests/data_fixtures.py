"""Helpers for the data tests: a tiny local tokenizer, images and ALLaVA-format JSON on disk."""

from __future__ import annotations

import io
import json
import os
import random

import numpy as np
from PIL import Image

WORDS = [f"w{i}" for i in range(200)] + [
    "[", "]", "[/", "INST", "describe", "the", "image", "what", "is", "this", "a", "cat", "dog",
    "yes", "no", "red", "blue", ".", "?", ",", "\n",
]


def make_tokenizer():
    """WordLevel tokenizer (whitespace split) with <|endoftext|> EOS and an added <image> token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<|endoftext|>": 1}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="[UNK]")
    hf.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return hf


def image_bytes(w: int, h: int, fmt: str = "JPEG", mode: str = "RGB", seed: int = 0, **save_kw) -> bytes:
    """A smooth random image (so JPEG/resize behave like photos) encoded as bytes."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(base, "RGB").resize((w, h), Image.Resampling.BILINEAR)
    noise = rng.integers(-20, 20, size=(h, w, 3))
    img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8), "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kw)
    return buf.getvalue()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(200)}" for _ in range(n))


def write_dataset(
    root: str,
    n_image: int = 12,
    n_text: int = 6,
    *,
    seed: int = 0,
    image_px: int = 40,
    max_words: int = 30,
    multi_turn: bool = True,
    name: str = "data.json",
) -> tuple[str, str]:
    """Writes ALLaVA-format JSON (image + text-only records) and its images; returns (json, root)."""
    rng = random.Random(seed)
    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir, exist_ok=True)
    records = []
    for i in range(n_image):
        fname = f"images/img{seed}_{i}.jpg"
        with open(os.path.join(root, fname), "wb") as f:
            f.write(image_bytes(image_px + i % 7, image_px - i % 5, seed=seed * 1000 + i))
        conv = [{"from": "human", "value": "<image>\n" + sentence(rng, rng.randint(1, max_words))},
                {"from": "gpt", "value": sentence(rng, rng.randint(1, max_words))}]
        if multi_turn and i % 3 == 0:
            conv += [{"from": "human", "value": sentence(rng, rng.randint(1, 10))},
                     {"from": "gpt", "value": sentence(rng, rng.randint(1, 10))}]
        records.append({"id": f"img-{seed}-{i}", "image": fname, "conversations": conv})
    for i in range(n_text):
        conv = [{"from": "human", "value": sentence(rng, rng.randint(1, max_words))},
                {"from": "gpt", "value": sentence(rng, rng.randint(1, max_words))}]
        records.append({"idx": f"txt-{seed}-{i}", "conversations": conv})
    path = os.path.join(root, name)
    with open(path, "w") as f:
        json.dump(records, f)
    return path, root
