"""A tiny random transformers ``CLIPModel`` with a tiny CLIP BPE tokenizer, saved as a directory
that ``convert import --clip`` reads, and images to score."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import transformers
from PIL import Image
from transformers.convert_slow_tokenizer import bytes_to_unicode

from hf_models import randomize

LETTERS = "etaoinshrdlucmfwypvbgk"


def clip_tokenizer() -> transformers.CLIPTokenizer:
    """CLIP's tokenizer shape (byte-level BPE, ``</w>`` word ends, BOS/EOS/pad) over 594 tokens."""
    chars = list(bytes_to_unicode().values())
    merges = [(a, b + "</w>") for a, b in itertools.product(LETTERS[:9], LETTERS[:9])][:40]
    merges += [(a, b) for a, b in itertools.product(LETTERS[:8], LETTERS[:8])][:40]
    vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)


def clip_model(tokenizer: transformers.CLIPTokenizer, seed: int = 10, image_size: int = 32,
               patch_size: int = 8) -> transformers.CLIPModel:
    """Every parameter random, ``logit_scale`` included."""
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=patch_size),
        projection_dim=16,
    )
    return randomize(transformers.CLIPModel(cfg), seed=seed, scale=0.2)


def clip_dir(path: Path, seed: int = 10) -> tuple[Path, transformers.CLIPModel, transformers.CLIPTokenizer]:
    """A ``save_pretrained`` CLIPModel directory with its tokenizer and image processor."""
    tok = clip_tokenizer()
    model = clip_model(tok, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    size = model.config.vision_config.image_size
    transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size=size).save_pretrained(path)
    return path, model, tok


def picture(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A smooth random RGB image (not square, so the centre crop matters)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    img = Image.fromarray(small, "RGB").resize(size, Image.Resampling.BILINEAR)
    noise = rng.integers(-20, 21, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(img).astype(int) + noise, 0, 255).astype(np.uint8), "RGB")
