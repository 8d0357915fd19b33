"""``python -m allava_jax.eval --checkpoint DIR --tasks mme,gqa [--include-path DIR] [--limit N]``.

Prints lmms-eval's results table to stdout (logs to stderr) and writes the full results JSON to
``--output`` when given.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from allava_jax.errors import report_user_errors


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m allava_jax.eval", description="Score a checkpoint on lmms-eval tasks.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tasks", required=True, help="comma-separated lmms-eval task or group names")
    p.add_argument("--include-path", action="append", help="directory of local task YAMLs (repeatable)")
    p.add_argument("--no-default-tasks", action="store_true", help="only index --include-path tasks (faster, offline)")
    p.add_argument("--limit", type=float, help="examples per task (for smoke tests)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128, help="used when a task does not set one")
    p.add_argument("--gen-kwargs", help="override task generation kwargs, e.g. 'max_new_tokens=32,temperature=0'")
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    p.add_argument("--tokenizer")
    p.add_argument("--output", help="write the results JSON here")
    p.add_argument("--log-samples", action="store_true", help="keep per-sample outputs in the JSON")
    return p


@report_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        print("error: lmms-eval is not installed: pip install -r requirements-eval.txt", file=sys.stderr)
        return 2
    from lmms_eval.utils import make_table

    from allava_jax.eval.runner import evaluate

    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    results = evaluate(
        args.checkpoint,
        [t for t in args.tasks.split(",") if t],
        include_path=args.include_path,
        include_defaults=not args.no_default_tasks,
        limit=limit,
        batch_size=args.batch_size,
        gen_kwargs=args.gen_kwargs,
        log_samples=args.log_samples,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
    )
    print(make_table(results))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
