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


BPE_CORPUS = [
    "[INST] What colour is the cat? [/INST] The cat is red.", "Yes, it is blue.",
    "[INST] Which cat is red? [/INST] The first cat is red.", "No.",
]


PHI3_CHAT_TOKENS = ("<|user|>", "<|end|>", "<|assistant|>")

# Phi-3-mini-128k-instruct's own chat template (its tokenizer_config.json, the revision without a
# leading BOS), for the tests of our "phi3" template.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def make_bpe_tokenizer(extra_special: tuple[str, ...] = ()):
    """A Phi-2-style byte-level BPE (GPT-2 pre-tokenizer, no prefix space, ``<|endoftext|>`` as
    BOS/EOS/UNK, an added ``<image>``, and ``extra_special`` tokens such as Phi-3's chat tokens),
    trained so that " The" and "The" are different tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(BPE_CORPUS * 50 + ["The cat.", "Which"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<image>", *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", additional_special_tokens=["<image>", *extra_special])


REFERENCE_IMAGE_INDEX = -200  # ALLaVA's IMAGE_TOKEN_INDEX


def reference_allava_ids(tok, convs):
    """ALLaVA's ``preprocess_allava`` + ``tokenizer_image_token`` (allava/serve/cli.py), rebuilt:
    each human turn ``[INST] {h.strip()} [/INST] `` tokenized on its own in chunks split at
    ``<image>``, each answer ``{g}{eos}`` on its own; a ``None`` answer ends the prompt. Returns
    (ids, per-token "is answer" flags)."""
    ids, is_answer = [], []
    for ind, conv in enumerate(convs):
        if ind % 2 == 0:
            h = f"[INST] {conv['value'].strip()} [/INST] "
            chunks = [tok(c, add_special_tokens=False).input_ids for c in h.split("<image>")]
            cur = []
            for j, chunk in enumerate(chunks):
                cur += ([REFERENCE_IMAGE_INDEX] if j else []) + chunk
            ids, is_answer = ids + cur, is_answer + [False] * len(cur)
        elif conv["value"] is not None:
            cur = tok(f"{conv['value']}{tok.eos_token}", add_special_tokens=False).input_ids
            ids, is_answer = ids + cur, is_answer + [True] * len(cur)
    return ids, is_answer


def expand_reference_images(ids, flags, image_id, n):
    """The reference's one image index per image -> ``n`` placeholder ids (HF Llava's layout)."""
    out_ids, out_flags = [], []
    for i, f in zip(ids, flags):
        out_ids += [image_id] * n if i == REFERENCE_IMAGE_INDEX else [i]
        out_flags += [f] * (n if i == REFERENCE_IMAGE_INDEX else 1)
    return out_ids, out_flags


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
