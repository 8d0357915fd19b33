"""Data commands.

    python -m allava_jax.data check --data A.json --data B.jsonl --image-root DIR --tokenizer DIR
    python -m allava_jax.data check --data A.json --image-root A.json=/imgs/a --image-root /imgs/common ...
    python -m allava_jax.data prepare --data A.json --image-root DIR --out /data/tfds
    python -m allava_jax.data plan --data A.json --data B.json --tokenizer DIR --seq-len 2048 \
        --row-len 4096 --out plans/s1.plan           # then data.packing="offline", data.plan=...
    python -m allava_jax.data plan ... --shard-index I --num-shards N   # on N hosts, shared FS

`--image-root DIR` applies to every --data file (repeat it for several roots, searched in order);
`--image-root FILE=DIR` applies to one file only. `--data` may also be a source dict as JSON,
e.g. '{"path": "A.json", "copies": 2, "subset": "A.subset.npy"}' (a plan must list the sources
exactly as the training config does). `check` and `plan` exit with status 1 when the skipped
fraction exceeds --max-bad-fraction (`plan` then writes nothing).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from allava_jax.data import check as check_lib
from allava_jax.data.templates import TEMPLATES
from allava_jax import storage
from allava_jax.errors import UserError, report_user_errors


def _sources(data: list[str], roots: list[str], template: str) -> list[dict]:
    """Pairs --data files (or JSON source dicts) with their image roots (global and FILE=DIR ones)."""
    specs = []
    for d in data:
        try:
            spec = json.loads(d) if d.lstrip().startswith("{") else {"path": d}
        except json.JSONDecodeError as e:
            raise UserError(f"--data {d}: not a JSON source dict ({e})") from None
        specs.append({"template": template, **spec})
    per_file: dict[str, list[str]] = {s.get("path"): [] for s in specs}
    shared = []
    for r in roots:
        key, sep, val = r.partition("=")
        if sep and key in per_file:
            per_file[key].append(val)
        else:
            shared.append(r)
    for s in specs:
        if "image_root" not in s and "image_roots" not in s:
            s["image_root"] = per_file[s.get("path")] + shared
    return specs


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append", required=True,
                   help="JSON/JSONL file, TFDS dir, or a source dict as JSON (see above)")
    p.add_argument("--image-root", action="append", default=[], help="DIR or FILE=DIR")
    p.add_argument("--template", default="allava", choices=TEMPLATES,
                   help="conversation template (the model's chat_template) or plain (captions)")
    p.add_argument("--cache-dir", default=None, help="where JSON indexes are cached")


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m allava_jax.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="validate a dataset and report what training will see")
    _add_source_args(c)
    c.add_argument("--tokenizer", required=True, help="local tokenizer directory")
    c.add_argument("--seq-len", type=int, default=2048)
    c.add_argument("--image-size", type=int, default=336)
    c.add_argument("--num-image-tokens", type=int, default=576)
    c.add_argument("--max-images", type=int, default=4)
    c.add_argument("--max-bad-fraction", type=float, default=0.05)
    c.add_argument("--workers", type=int, default=0)
    c.add_argument("--no-decode", action="store_true",
                   help="only read image headers (much faster; misses corrupt pixel data)")

    p = sub.add_parser("prepare", help="write a TFDS ArrayRecord dataset (records + image bytes)")
    _add_source_args(p)
    p.add_argument("--out", required=True, help="TFDS data_dir to write into")
    p.add_argument("--num-shards", type=int, default=None)

    pl = sub.add_parser("plan", help="offline packing: sample lengths -> packed rows (ArrayRecord + manifest)")
    _add_source_args(pl)
    pl.add_argument("--tokenizer", required=True, help="local tokenizer directory (the run's)")
    pl.add_argument("--seq-len", type=int, default=2048, help="per-sample maximum (truncation as in training)")
    pl.add_argument("--row-len", type=int, default=None, help="tokens per packed row (default: --seq-len)")
    pl.add_argument("--out", required=True, help="plan file (ArrayRecord); the manifest goes to OUT.json")
    pl.add_argument("--num-image-tokens", type=int, default=576)
    pl.add_argument("--max-images", type=int, default=4, help="image slots per row (data.max_images_per_row)")
    pl.add_argument("--max-patches", type=int, default=0,
                    help="native resolution: vision patches per row (data.max_patches_per_row); each image's "
                         "tokens from its header's size; 0 = fixed --num-image-tokens")
    pl.add_argument("--min-pixels", type=int, default=3136, help="native resolution: the model's vision.min_pixels")
    pl.add_argument("--max-pixels", type=int, default=2560000, help="native resolution: the model's vision.max_pixels")
    pl.add_argument("--max-image-side", type=int, default=0, help="native resolution: data.max_image_side (0 = none)")
    pl.add_argument("--method", default="best", choices=("best", "bfd", "bucket"),
                    help="best-fit decreasing, LLaVA-OneVision-1.5's length buckets, or the better of the two")
    pl.add_argument("--seed", type=int, default=0, help="row order in the file; the subset of fractional copies")
    pl.add_argument("--max-bad-fraction", type=float, default=0.05)
    pl.add_argument("--workers", type=int, default=0)
    pl.add_argument("--shard-index", type=int, help="this process's share of the lengths chunks (with --num-shards)")
    pl.add_argument("--num-shards", type=int,
                    help="processes measuring lengths into OUT.lengths/ on a shared filesystem "
                         "(default: jax.distributed's process count, 1 for a lone process)")
    pl.add_argument("--chunk-size", type=int, default=None, help="mixture elements per lengths chunk")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    srcs = _sources(args.data, args.image_root, args.template)
    # Paths may be on a bucket (gs://): a missing bucket or no permission fails here, in seconds.
    for src in srcs:
        roots = src.get("image_roots", src.get("image_root")) or []
        for path in [src["path"], *([roots] if isinstance(roots, str) else roots)]:
            storage.check_access(path)
    if getattr(args, "out", None):
        storage.check_access(args.out, write=True)
    if args.command == "check":
        report = check_lib.run_check(
            srcs, args.tokenizer, seq_len=args.seq_len, image_size=args.image_size,
            num_image_tokens=args.num_image_tokens, max_images_per_sample=args.max_images,
            decode_images=not args.no_decode, worker_count=args.workers,
            max_bad_fraction=args.max_bad_fraction, cache_dir=args.cache_dir,
        )
        print(report.format(args.seq_len))
        return 0 if report.ok else 1
    if args.command == "plan":
        return _plan(args, srcs)
    from allava_jax.data import prepare  # local: imports tensorflow_datasets

    out, skipped = prepare.prepare_tfds(srcs, args.out, num_shards=args.num_shards,
                                        cache_dir=args.cache_dir)
    print(f"prepared {out}; skipped {skipped or 'none'}")
    print(f'use it as a source: {{"path": "{out}"}}')
    return 0


def _plan(args: argparse.Namespace, srcs: list[dict]) -> int:
    from allava_jax import work_split
    from allava_jax.data import native
    from allava_jax.data import plan as plan_lib  # local: imports array_record

    shard = work_split.shard_of(args.shard_index, args.num_shards)
    report, manifest = plan_lib.make_plan(
        srcs, args.tokenizer, args.out, seq_len=args.seq_len, row_len=args.row_len or args.seq_len,
        num_image_tokens=args.num_image_tokens, max_images=args.max_images, seed=args.seed,
        method=args.method, worker_count=args.workers, max_bad_fraction=args.max_bad_fraction,
        cache_dir=args.cache_dir, shard=shard, chunk_size=args.chunk_size or plan_lib.CHUNK_SIZE,
        native=native.NativeSpec(args.min_pixels, args.max_pixels, args.max_image_side) if args.max_patches else None,
        max_patches=args.max_patches)
    if report is None:
        print(f"shard {shard[0]} of {shard[1]}: its lengths are in {plan_lib.lengths_dir(args.out)}; other "
              "shards' chunks are not done yet, and the last shard to finish writes the plan")
        return 0
    print(report.format(args.seq_len))
    if manifest is None:
        print("no plan written" + ("" if report.usable else ": no usable samples"))
        return 1
    print(f"plan: {manifest['rows']} rows of {manifest['row_len']} tokens ({manifest['method']}), "
          f"utilisation {manifest['utilisation']:.1%} (real tokens / row slots); LLaVA-style padded "
          f"batches {manifest['llava_padded_utilisation']:.1%}: "
          f"{plan_lib.padding_ratio(manifest['utilisation'], manifest['llava_padded_utilisation']):.1f}x less padding")
    print(f"wrote {args.out} and {plan_lib.manifest_path(args.out)}; train on it with "
          f'data.packing="offline", data.plan="{args.out}", data.seq_len={args.seq_len}')
    return 0


if __name__ == "__main__":
    sys.exit(main())
