"""``python -m allava_jax.curate score | embed | balance``: CLIP-based data curation.

``score``: SynthVLM's CLIPScore / SSIM selection of image-caption pairs. ``embed`` + ``balance``:
LLaVA-OneVision-1.5's concept-balanced sampling.

    python -m allava_jax.convert import --clip clip-vit-base-patch32/ --out runs/clip_b32
    python -m allava_jax.curate score --data runs/synth/images.json --image-root runs/synth \\
        --clip runs/clip_b32 --ssim --per-caption best --top 100000 --out runs/selected
    python -m allava_jax.curate embed --data laion.json --image-root laion/ --clip runs/clip_b32 --out runs/emb
    python -m allava_jax.curate balance --embeddings runs/emb --concepts metaclip_entries.txt \\
        --clip runs/clip_b32 --top-k 3 --target 100000 --out runs/balanced
"""

from __future__ import annotations

import argparse
import json
import sys

from allava_jax import storage
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
    sc.add_argument("--out", required=True, help="run directory (chunks, scores.jsonl, selected.json)")
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
    _add_shard_args(sc)
    em = sub.add_parser("embed", help="CLIP image embeddings of every record, in resumable chunks",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    em.add_argument("--data", nargs="+", required=True, help="LLaVA/ALLaVA JSON or JSONL files")
    em.add_argument("--image-root", nargs="*", default=[], help="folders image paths are relative to")
    em.add_argument("--clip", required=True, help="a CLIP scorer checkpoint (convert import --clip)")
    em.add_argument("--out", required=True)
    em.add_argument("--chunk-size", type=int, default=4096)
    em.add_argument("--batch-size", type=int, default=64)
    em.add_argument("--workers", type=int, default=4)
    em.add_argument("--no-progress", action="store_true")
    _add_shard_args(em)
    ba = sub.add_parser("balance", help="concept-balanced subset or per-record weights from embeddings",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ba.add_argument("--embeddings", required=True, help="a `curate embed` output directory")
    ba.add_argument("--concepts", required=True, help="concept entries: one per line, or a JSON list")
    ba.add_argument("--clip", required=True, help="the CLIP scorer checkpoint the embeddings were made with")
    ba.add_argument("--top-k", type=int, default=1, help="concepts per image")
    what = ba.add_mutually_exclusive_group(required=True)
    what.add_argument("--target", type=int, help="sample this many records without replacement")
    what.add_argument("--weights-only", action="store_true", help="write per-record weights instead")
    ba.add_argument("--t", type=float, help="MetaCLIP's threshold t (default: target * top_k / concepts matched)")
    ba.add_argument("--concept-template", default="{}", help="text embedded for each concept, e.g. 'a photo of {}'")
    ba.add_argument("--seed", type=int, default=0)
    ba.add_argument("--out", required=True)
    return p


def _add_shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard-index", type=int, help="this process's share of the chunks (with --num-shards)")
    p.add_argument("--num-shards", type=int,
                   help="processes splitting the chunks over one shared --out (default: jax.distributed's)")


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    storage.check_access(args.out, write=True)  # gs:// allowed; a missing bucket fails here, in seconds
    if args.command in ("score", "embed"):
        from allava_jax.train.distributed import initialize

        initialize()  # joins a multi-host job when the cluster is detected; a lone process does nothing
    if args.command == "score":
        from allava_jax.curate.score import ScoreSettings, run_score

        summary = run_score(ScoreSettings(
            data=args.data, image_roots=args.image_root, clip=args.clip, out=args.out, ssim=args.ssim,
            per_caption=args.per_caption, top=args.top, min_score=args.min_score, lam=args.lam, w=args.w,
            chunk_size=args.chunk_size, batch_size=args.batch_size, workers=args.workers,
            progress=not args.no_progress, shard_index=args.shard_index, num_shards=args.num_shards))
    elif args.command == "embed":
        from allava_jax.curate.embed import EmbedSettings, run_embed

        summary = run_embed(EmbedSettings(
            data=args.data, image_roots=args.image_root, clip=args.clip, out=args.out, chunk_size=args.chunk_size,
            batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress,
            shard_index=args.shard_index, num_shards=args.num_shards))
    else:
        from allava_jax.curate.balance import BalanceSettings, run_balance

        summary = run_balance(BalanceSettings(
            embeddings=args.embeddings, concepts=args.concepts, clip=args.clip, out=args.out, top_k=args.top_k,
            target=args.target, t=args.t, seed=args.seed, concept_template=args.concept_template))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
