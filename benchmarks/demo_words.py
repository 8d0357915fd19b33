"""Which words of the demo's answers a trained demo model reads from the image, teacher-forced.

    python benchmarks/demo_words.py --checkpoint runs/demo_ov15/stage2 [--data demo_ov15_data] [--records 600]
    python benchmarks/demo_words.py --checkpoint runs/demo/stage2 --data demo_data    # the CLIP demo

Feeds the first ``--records`` training instructions (question, image and the true answer) through
the checkpoint in one forward pass each and counts, per kind of answer word, how often the
model's most likely next token is the true one at that word's first mention (later mentions can
be copied from the earlier one): the colour, the shape, the size, the vertical position (upper /
lower) and the horizontal position (left / right); the shape also per image size.

Why it exists: without its stage 0, ``configs/demo_ov15.py`` names every colour but only ~60 % of
shapes. The split between the vertical and the horizontal position shows how a decoder reads an
image: a shift of the shape by 12 % of the image moves its tokens by about half a row of tokens
vertically but about one token horizontally (docs/llava_ov15_training.md, "The demo").
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from allava_jax import checkpoints  # noqa: E402
from allava_jax.data import demo  # noqa: E402
from allava_jax.infer import media, prompts  # noqa: E402
from allava_jax.infer.engine import Prompt, make_batch  # noqa: E402
from allava_jax.infer.loading import load_tokenizer  # noqa: E402
from allava_jax.models.llava import Llava  # noqa: E402

KINDS = {
    "colour": set(demo.COLOURS),
    "shape": set(demo.SHAPES),
    "size": set(demo.SIZES),
    "vertical": {"upper", "lower"},
    "horizontal": {"left", "right"},
}
BATCH = 8


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a demo checkpoint (e.g. runs/demo_ov15/stage2)")
    parser.add_argument("--data", default="demo_ov15_data", help="the demo data it was trained on")
    parser.add_argument("--records", type=int, default=600, help="training instructions scored")
    args = parser.parse_args(argv)
    config, params = checkpoints.load_model(args.checkpoint)
    tokenizer = load_tokenizer(args.checkpoint)
    model = Llava(config)
    forward = jax.jit(lambda p, tokens, images, segments, positions: model.apply(
        {"params": p}, tokens, images, None, segments, positions))
    root = Path(args.data)
    records = json.loads((root / demo.FILES["instruct"]).read_text())[: args.records]

    examples = []  # (prompt ids + answer ids, images, number of answer ids, answer ids, image size)
    for r in records:
        question = r["conversations"][0]["value"].replace("<image>\n", "")
        image = media.load_file(root / r["image"], config.vision)
        counts = [image.num_tokens] if media.is_native(config.vision) else config.num_image_tokens
        ids = prompts.encode_generation_prompt(tokenizer, prompts.single_turn(question, 1), 1,
                                               image_token_id=config.image_token_id, num_image_tokens=counts,
                                               template=config.chat_template)
        answer = tokenizer.encode(r["conversations"][1]["value"], add_special_tokens=False)
        examples.append((ids + answer, media.stack([image], config.vision), answer, Image.open(root / r["image"]).size))
    length = max(len(e[0]) for e in examples)  # one length: one compiled program per patch bucket

    hits: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for start in range(0, len(examples), BATCH):
        chunk = examples[start : start + BATCH]
        batch = make_batch([Prompt(ids, images) for ids, images, _, _ in chunk], BATCH, length, config.vision)
        predicted = np.asarray(forward(params, batch.tokens, batch.images, batch.segment_ids, batch.positions)).argmax(-1)  # [B, L]: the next token at each position
        for row, (_, _, answer, size) in enumerate(chunk):
            guesses = predicted[row, length - len(answer) - 1 : length - 1]  # left-padded: answers end the row
            seen = set()
            for token, guess in zip(answer, guesses):
                word = tokenizer.decode([token]).strip().strip(".,").lower()
                kind = next((k for k, words in KINDS.items() if word in words), None)
                if kind is None or kind in seen:
                    continue
                seen.add(kind)
                for key in (kind, f"shape {size[0]}x{size[1]}") if kind == "shape" else (kind,):
                    hits[key][0] += int(guess == token)
                    hits[key][1] += 1
    print(f"teacher-forced first mentions, {len(examples)} training instructions of {args.data}, {args.checkpoint}")
    print("| answer word | right | of | accuracy |\n|---|---:|---:|---:|")
    for key in [*KINDS, *sorted(k for k in hits if k.startswith("shape "))]:
        right, total = hits[key]
        print(f"| {key} | {right} | {total} | {right / max(total, 1):.0%} |")


if __name__ == "__main__":
    main()
