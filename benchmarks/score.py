"""CLIPScore pairs/s: ``curate score``'s scorer vs transformers' CLIPModel + CLIPProcessor.

    python benchmarks/score.py [--pairs 64] [--repeats 3] [--threads 2]

Same random ViT-B/32-sized weights on both sides (HF ``CLIPConfig()`` defaults: 224 px, patch
32, 12 + 12 layers, projection 512; copied through ``convert import --clip``), same tokenizer (a
tiny CLIP BPE: tokenisation cost is not what is measured), same JPEG files (512 px), fp32 on this
CPU. A pair is scored end to end: file read, decode, CLIP preprocessing, both towers, cosine.
Ours is the real ``curate.score.score_chunk`` path (threads decode images while XLA runs; each
distinct caption embedded once); transformers' is SynthVLM's procedure per batch (processor, then
model). Cases: one image per caption, and SynthVLM's several images per caption. Each side's
figure is its fastest of ``--repeats`` runs, the two sides' runs interleaved.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402

import clip_fixtures as C  # noqa: E402
from allava_jax.convert.importer import import_clip  # noqa: E402
from allava_jax.curate.pairs import Pair  # noqa: E402
from allava_jax.curate.score import ScoreSettings, score_chunk  # noqa: E402
from allava_jax.curate.scorer import PREFIX, ClipScorer  # noqa: E402
from allava_jax.train.flops import measure_matmul_flops  # noqa: E402
from timing import best_times  # noqa: E402

BATCH = 32


def make_pairs(root: Path, n: int, per_caption: int) -> list[Pair]:
    pairs = []
    for i in range(n):
        name = f"img{i}.jpg"
        C.picture(i, (512, 512)).save(root / name, quality=90)
        caption = f"a photo number {i // per_caption} of a red bike leaning on a white wall in the morning sun"
        pairs.append(Pair(str(i), str(i), name, caption, str(i // per_caption), {}))
    return pairs


def ours(scorer: ClipScorer, pairs: list[Pair], settings: ScoreSettings, pool: ThreadPoolExecutor) -> np.ndarray:
    rows = []
    for s in range(0, len(pairs), BATCH):
        rows += score_chunk(pairs[s : s + BATCH], scorer, settings, pool)
    return np.array([r["cos"] for r in rows])


def theirs(model: transformers.CLIPModel, processor, pairs: list[Pair], root: Path) -> np.ndarray:
    out = []
    for s in range(0, len(pairs), BATCH):
        batch = pairs[s : s + BATCH]
        images = [Image.open(root / p.image).convert("RGB") for p in batch]
        enc = processor(text=[PREFIX + p.caption for p in batch], images=images, return_tensors="pt", padding=True,
                        truncation=True, max_length=77)
        with torch.no_grad():
            o = model(**enc)
        out.append((o.image_embeds * o.text_embeds).sum(-1).numpy())
    return np.concatenate(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--per-caption", type=int, default=4, help="images per caption of the SynthVLM case")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    peak = measure_matmul_flops(2048) / 1e9
    tok = C.clip_tokenizer()
    cfg = transformers.CLIPConfig(text_config=dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                                   bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id))
    model = C.randomize(transformers.CLIPModel(cfg), seed=0, scale=0.02)
    processor = transformers.CLIPProcessor(image_processor=transformers.CLIPImageProcessor(), tokenizer=tok)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model.save_pretrained(root / "hf")
        tok.save_pretrained(root / "hf")
        import_clip(root / "hf", root / "scorer", progress=False, log=lambda _: None)
        scorer = ClipScorer(root / "scorer", batch_size=BATCH)
        settings = ScoreSettings(data=[str(root / "x.json")], image_roots=[str(root)], clip=str(root / "scorer"),
                                 out=root / "out")
        print(f"\nfp32 matmul peak measured now: {peak:.0f} GFLOP/s; {args.threads} threads; {args.pairs} pairs, "
              f"512 px JPEG, ViT-B/32-sized random weights")
        print("| images per caption | ours pairs/s | transformers pairs/s | ratio | max abs cos diff |")
        print("|---|---:|---:|---:|---:|")
        with ThreadPoolExecutor(4) as pool:
            for per_caption in (1, args.per_caption):
                pairs = make_pairs(root, args.pairs, per_caption)
                ours(scorer, pairs[:BATCH], settings, pool)  # compile
                (t_ours, cos_ours), (t_hf, cos_hf) = best_times(
                    [lambda: ours(scorer, pairs, settings, pool), lambda: theirs(model, processor, pairs, root)],
                    args.repeats)
                n = len(pairs)
                print(f"| {per_caption} | {n / t_ours:.1f} | {n / t_hf:.1f} | {t_hf / t_ours:.2f}x | "
                      f"{np.abs(cos_ours - cos_hf).max():.1e} |")


if __name__ == "__main__":
    main()
