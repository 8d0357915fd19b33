"""``python -m allava_jax.curate score``: CLIPScore / SSIM selection of image-caption pairs (SynthVLM).

    python -m allava_jax.convert import --clip clip-vit-base-patch32/ --out runs/clip_b32
    python -m allava_jax.curate score --data runs/synth/images.json --image-root runs/synth \\
        --clip runs/clip_b32 --ssim --per-caption best --top 100000 --out runs/selected
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from allava_jax.errors import report_user_errors


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m allava_jax.curate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("score", help="CLIPScore (+ SSIM) every pair, keep the best",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sc.add_argument("--data", nargs="+", required=True, help="LLaVA/ALLaVA JSON or JSONL files of image-caption records")
    sc.add_argument("--image-root", nargs="*", default=[], help="folders image paths are relative to (default: the data file's)")
    sc.add_argument("--clip", required=True, help="a CLIP scorer checkpoint (convert import --clip)")
    sc.add_argument("--out", required=True, type=Path, help="run directory (chunks, scores.jsonl, selected.json)")
    sc.add_argument("--ssim", action="store_true", help="also SynthVLM's 768->336->768 round-trip SSIM")
    sc.add_argument("--per-caption", default="best", choices=("best", "all"),
                    help="best: keep only each caption's highest-CLIPScore image")
    sc.add_argument("--top", type=int, help="keep the N best pairs by CLIPScore + lambda x SSIM")
    sc.add_argument("--min-score", type=float, help="keep pairs whose CLIPScore + lambda x SSIM is at least this")
    sc.add_argument("--lam", type=float, default=0.5, help="lambda, the SSIM weight")
    sc.add_argument("--w", type=float, default=2.5, help="CLIPScore's w (Hessel et al.)")
    sc.add_argument("--chunk-size", type=int, default=1024, help="pairs per resumable chunk")
    sc.add_argument("--batch-size", type=int, default=64, help="images/captions per device batch (all devices)")
    sc.add_argument("--workers", type=int, default=4, help="image decoding threads")
    sc.add_argument("--no-progress", action="store_true")
    return p


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from allava_jax.curate.score import ScoreSettings, run_score

    summary = run_score(ScoreSettings(
        data=args.data, image_roots=args.image_root, clip=args.clip, out=args.out, ssim=args.ssim,
        per_caption=args.per_caption, top=args.top, min_score=args.min_score, lam=args.lam, w=args.w,
        chunk_size=args.chunk_size, batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
