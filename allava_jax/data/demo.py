"""The built-in demo dataset: coloured shapes in the exact ALLaVA-4V record format.

No real data or pretrained weights are reachable offline, so the demo makes its own: PNG images of
one coloured shape on a grey background; stage-1 detailed captions (ALLaVA-Caption-4V layout);
stage-2 questions with detailed answers (ALLaVA-Instruct-4V layout); text-only records in the
Evol-Instruct layout (``idx``, no image); a held-out split; and a byte-level BPE tokenizer trained
on all of it, with ``<|endoftext|>`` as EOS and an ``<image>`` token.

``native=True`` makes the variant for native-resolution models (``configs/demo_ov15.py``): images
of several sizes and aspect ratios (``NATIVE_SIZES``; each keeps its size, so costs its own number
of tokens) and a tokenizer that also has Qwen2-VL's chat tokens (``NATIVE_SPECIAL_TOKENS``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 30),
    "purple": (140, 50, 170),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
# Shapes are large so that a from-scratch vision tower tells them apart within the demo's budget:
# the position is a small offset from the centre, the size a radius in image widths.
POSITIONS = {"upper left": (0.44, 0.44), "upper right": (0.56, 0.44), "lower left": (0.44, 0.56), "lower right": (0.56, 0.56)}
SIZES = {"medium": 0.30, "large": 0.40}

CAPTION_PROMPTS = (
    "Describe the image in detail.",
    "Give a detailed description of this picture.",
    "What does this image show? Describe it carefully.",
)
QUESTIONS = {
    "colour": ("What colour is the shape in this image?", "Which colour does the object in the picture have?"),
    "shape": ("What kind of shape is shown in this image?", "Which geometric shape can you see in the picture?"),
}
FILES = {
    "caption": "allava_demo_caption.json",
    "instruct": "allava_demo_instruct.json",
    "text": "evol_demo_text.json",
    "heldout": "allava_demo_heldout.json",
    "tokenizer": "tokenizer",
}
SPECIAL_TOKENS = ("<|endoftext|>", "<image>")
# The native variant: (W, H) in px, multiples of 28 (so smart_resize keeps them): 3:2 .. 1:2.
NATIVE_SIZES = ((112, 112), (140, 84), (84, 140), (168, 84), (84, 168), (112, 84), (84, 112), (140, 140))
NATIVE_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")


def draw(colour: str, shape: str, position: str, size: str, rng: random.Random, pixels: int = 64,
         height: int | None = None) -> Image.Image:
    """One shape on grey, ``pixels`` wide and ``height`` (default: ``pixels``) high; the shape's
    radius is relative to the shorter side."""
    height = height or pixels
    grey = rng.randint(190, 225)
    img = Image.new("RGB", (pixels, height), (grey, grey, grey))
    d = ImageDraw.Draw(img)
    cx, cy = POSITIONS[position][0] * pixels, POSITIONS[position][1] * height
    r = SIZES[size] * min(pixels, height) * rng.uniform(0.92, 1.05)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return img


def caption(colour: str, shape: str, position: str, size: str) -> str:
    return (
        f"The image shows a {size} {colour} {shape} on a plain light grey background. "
        f"The {shape} sits slightly to the {position} of the centre, and its {colour} colour stands out "
        f"clearly against the grey. There are no other objects, people or text in the scene."
    )


def answer(kind: str, colour: str, shape: str, position: str, size: str) -> str:
    if kind == "colour":
        return (
            f"Looking closely at the image, the shape is {colour}. It is a {size} {shape} slightly to the "
            f"{position} of the centre, filled with a solid {colour} colour on a grey background."
        )
    return (
        f"Looking closely at the image, the object is a {shape}. It is {colour} and {size}, and it "
        f"sits slightly to the {position} of the centre on a grey background."
    )


TEXT_FACTS = [
    ("What colour do you get when you mix red and yellow?", "Mixing red and yellow gives orange."),
    ("What colour do you get when you mix blue and yellow?", "Mixing blue and yellow gives green."),
    ("What colour do you get when you mix red and blue?", "Mixing red and blue gives purple."),
    ("How many sides does a triangle have?", "A triangle has three sides and three corners."),
    ("How many sides does a square have?", "A square has four equal sides and four right angles."),
    ("Does a circle have corners?", "No. A circle is perfectly round and has no corners or sides."),
    ("What does a cross look like?", "A cross is made of two bars that meet in the middle at right angles."),
    ("Is grey a bright colour?", "No. Grey is a quiet, neutral colour between black and white."),
]


def random_attributes(rng: random.Random) -> tuple[str, str, str, str]:
    """One image's (colour, shape, position, size), drawn as the dataset draws them."""
    return rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(POSITIONS)), rng.choice(list(SIZES))


def _record(rid: str, image: str, prompt: str, reply: str) -> dict:
    return {
        "id": rid,
        "image": image,
        "conversations": [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": reply}],
    }


def make_demo_dataset(root: str | Path, num_train: int = 2000, num_heldout: int = 120, seed: int = 0,
                      native: bool = False) -> Path:
    """Write the dataset and tokenizer under ``root`` if absent; return ``root``. ``native``: the
    variant for native-resolution models (see the module docstring)."""
    root = Path(root)
    if (root / FILES["tokenizer"] / "tokenizer.json").exists() and (root / FILES["heldout"]).exists():
        return root
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list] = {"caption": [], "instruct": [], "heldout": []}
    for i in range(num_train + num_heldout):
        attrs = random_attributes(rng)
        name = f"images/demo_{i:05d}.png"
        width, height = rng.choice(NATIVE_SIZES) if native else (64, 64)
        draw(*attrs, rng=rng, pixels=width, height=height).save(root / name)
        kind = rng.choice(list(QUESTIONS))
        question = rng.choice(QUESTIONS[kind])
        inst = _record(f"allava_demo_inst_{i}", name, question, answer(kind, *attrs))
        if i < num_train:
            splits["caption"].append(_record(f"allava_demo_cap_{i}", name, rng.choice(CAPTION_PROMPTS), caption(*attrs)))
            splits["instruct"].append(inst)
        else:
            inst["demo_answer"] = {"kind": kind, "colour": attrs[0], "shape": attrs[1]}
            splits["heldout"].append(inst)
    text = [
        {"idx": f"evol_demo_{j}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        for j, (q, a) in enumerate(TEXT_FACTS * 4)
    ]
    for key in ("caption", "instruct", "heldout"):
        (root / FILES[key]).write_text(json.dumps(splits[key]))
    (root / FILES["text"]).write_text(json.dumps(text))
    train_tokenizer(root, [*splits["caption"], *splits["instruct"], *text],
                    extra_special=NATIVE_SPECIAL_TOKENS if native else ())
    return root


def train_tokenizer(root: Path, records: list[dict], vocab_size: int = 1024, extra_special: tuple[str, ...] = ()) -> Path:
    """Byte-level BPE on the dataset's text as the template tokenizes it: each human turn as
    ``[INST] {text} [/INST] `` and each answer on its own, so an answer's first word (which follows
    the prompt's space token, with no space of its own) is a whole token, as in a real tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        f"[INST] {t['value'].replace('<image>', '').strip()} [/INST] " if t["from"] == "human" else t["value"]
        for r in records
        for t in r["conversations"]
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>", *extra_special]})
    out = root / FILES["tokenizer"]
    fast.save_pretrained(out)
    return out


def sources(root: str | Path, stage: int) -> list[dict]:
    """The demo's data mixture per stage, mirroring the paper (stage 1: captions + 2 copies of
    text; stage 2: instructions + 1 copy of text)."""
    root = str(root)
    text = {"name": "text", "path": f"{root}/{FILES['text']}", "copies": 2 if stage == 1 else 1}
    main = "caption" if stage == 1 else "instruct"
    return [{"name": main, "path": f"{root}/{FILES[main]}", "image_root": root}, text]


def heldout_records(root: str | Path) -> list[dict]:
    return json.loads((Path(root) / FILES["heldout"]).read_text())


def score(record: dict, generated: str) -> bool:
    """Correct iff the generated answer names the true attribute the question asks about (colour
    or shape) and no other value of that attribute."""
    truth = record["demo_answer"]
    kind = truth["kind"]
    values = list(COLOURS) if kind == "colour" else list(SHAPES)
    words = set(generated.lower().replace(".", " ").replace(",", " ").split())
    named = {v for v in values if v in words}
    return named == {truth[kind]}
