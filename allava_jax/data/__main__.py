"""Data commands.

    python -m allava_jax.data check --data A.json --data B.jsonl --image-root DIR --tokenizer DIR
    python -m allava_jax.data check --data A.json --image-root A.json=/imgs/a --image-root /imgs/common ...
    python -m allava_jax.data prepare --data A.json --image-root DIR --out /data/tfds

`--image-root DIR` applies to every --data file (repeat it for several roots, searched in order);
`--image-root FILE=DIR` applies to one file only. `check` exits with status 1 when the skipped
fraction exceeds --max-bad-fraction.
"""

from __future__ import annotations

import argparse
import logging
import sys

from allava_jax.data import check as check_lib
from allava_jax.data.templates import TEMPLATES
from allava_jax.errors import report_user_errors


def _sources(data: list[str], roots: list[str], template: str) -> list[dict]:
    """Pairs --data files with their image roots (global and FILE=DIR ones)."""
    per_file: dict[str, list[str]] = {d: [] for d in data}
    shared = []
    for r in roots:
        key, sep, val = r.partition("=")
        if sep and key in per_file:
            per_file[key].append(val)
        else:
            shared.append(r)
    return [{"path": d, "image_root": per_file[d] + shared, "template": template} for d in data]


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append", required=True, help="JSON/JSONL file or TFDS dir")
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

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    srcs = _sources(args.data, args.image_root, args.template)
    if args.command == "check":
        report = check_lib.run_check(
            srcs, args.tokenizer, seq_len=args.seq_len, image_size=args.image_size,
            num_image_tokens=args.num_image_tokens, max_images_per_sample=args.max_images,
            decode_images=not args.no_decode, worker_count=args.workers,
            max_bad_fraction=args.max_bad_fraction, cache_dir=args.cache_dir,
        )
        print(report.format(args.seq_len))
        return 0 if report.ok else 1
    from allava_jax.data import prepare  # local: imports tensorflow_datasets

    out, skipped = prepare.prepare_tfds(srcs, args.out, num_shards=args.num_shards,
                                        cache_dir=args.cache_dir)
    print(f"prepared {out}; skipped {skipped or 'none'}")
    print(f'use it as a source: {{"path": "{out}"}}')
    return 0


if __name__ == "__main__":
    sys.exit(main())
