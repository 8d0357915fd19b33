"""Chip-hours of LLaVA-OneVision-1.5's mid-training (stage 1.5) on TPU, estimated from analytic
model FLOPs, beside the authors' A800 figures. An estimate, not a measurement: nothing here ran on
a TPU.

    python benchmarks/ov15_chip_hours.py [--image-side 448] [--steps 70000] [--mfu 0.40,0.55] [--chip "TPU v5e"]

A step is ``configs/llava_ov15_stage1_5.py``'s: 112 packed rows of 8192 LLM tokens, each row
holding as many ``--image-side`` px square images as its patch budget (``max_patches_per_row``)
allows, the rest text; every parameter trained (the vision tower's forward counted x3), the LM head
on the text tokens only (``logits_fraction``), attention as ``train.flops`` counts it (PaLM's
12 * layers * hidden * seq_len per token, within each image for the tower). ``--steps``: the
authors' ~70K steps of 112 rows for 85M samples. Chip-hours = FLOPs / (chip's bf16 peak x MFU).

The authors' figures (``../shared/LLAVA-OV-1.5.md``): 8B stage 1.5 on 128 A800 in ~3.7 days
("45 % HFU at 8K context"; with full recompute a step does 8 N FLOPs per token for 6 N of model
work, so that is ~34 % MFU). The last table checks the FLOP count: the FLOPs those GPU-hours
deliver at that MFU against ours for the 8B.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allava_jax.models import get_preset  # noqa: E402
from allava_jax.train.flops import PEAK_FLOPS, train_step_flops  # noqa: E402

A800_PEAK = 312e12  # dense bf16, as the A100
AUTHORS = {"gpus": 128, "days": 3.7, "hfu": 0.45}
STAGE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "llava_ov15_stage1_5.py"


def step_flops(model: str, cfg, image_side: int) -> tuple[float, int, int]:
    """(model FLOPs of one stage-1.5 step, images per row, image tokens per row)."""
    config = get_preset(model)
    seq, rows, budget = cfg.data.seq_len, cfg.batch_size, cfg.data.max_patches_per_row
    patches = (image_side // config.vision.patch_size) ** 2
    images = min(budget // patches, seq * 4 // patches)
    image_tokens = images * patches // 4
    flops = train_step_flops(config, rows * seq, 0, seq, vision_trained=True, n_scored=rows * (seq - image_tokens),
                             image_patches=[patches] * (images * rows))
    return flops, images, image_tokens


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--image-side", type=int, default=448)
    p.add_argument("--steps", type=int, default=70000)
    p.add_argument("--mfu", default="0.40,0.55")
    p.add_argument("--chip", default="TPU v5e", choices=sorted(PEAK_FLOPS))
    args = p.parse_args()
    cfg = runpy.run_path(str(STAGE_CONFIG))["get_config"]()
    mfus = [float(m) for m in args.mfu.split(",")]
    peak = PEAK_FLOPS[args.chip]
    print(f"stage 1.5: {args.steps:,} steps of {cfg.batch_size} rows x {cfg.data.seq_len} tokens; "
          f"{args.image_side} px images within {cfg.data.max_patches_per_row} patches a row; {args.chip} peak "
          f"{peak / 1e12:.0f} TFLOP/s\n")
    head = " | ".join(f"{args.chip} chip-hours at {m:.0%} MFU" for m in mfus)
    print(f"| model | images (tokens) a row | model PFLOP a step | total ZFLOP | {head} |")
    print("| --- | ---: | ---: | ---: |" + " ---: |" * len(mfus))
    totals = {}
    for model in ("llava_ov15_4b", "llava_ov15_8b"):
        flops, images, image_tokens = step_flops(model, cfg, args.image_side)
        totals[model] = total = flops * args.steps
        hours = " | ".join(f"{total / (peak * m) / 3600:,.0f}" for m in mfus)
        print(f"| {model} | {images} ({image_tokens}) | {flops / 1e15:.1f} | {total / 1e21:.2f} | {hours} |")
    gpu_hours = AUTHORS["gpus"] * AUTHORS["days"] * 24
    mfu = AUTHORS["hfu"] * 6 / 8
    delivered = gpu_hours * 3600 * A800_PEAK * mfu
    print(f"\nthe authors' 8B: {AUTHORS['gpus']} A800 x {AUTHORS['days']} days = {gpu_hours:,.0f} GPU-hours at "
          f"{AUTHORS['hfu']:.0%} HFU (~{mfu:.0%} MFU) deliver {delivered / 1e21:.2f} ZFLOP of model work; "
          f"the count above gives {totals['llava_ov15_8b'] / 1e21:.2f} ZFLOP ({totals['llava_ov15_8b'] / delivered:.2f}x)")


if __name__ == "__main__":
    main()
