"""``python -m allava_jax.synth MODE --out DIR --model M [...]``: thin CLI over :func:`pipeline.run`.

Examples::

    OPENAI_API_KEY=... python -m allava_jax.synth laion --images imgs/ --out runs/laion --model gpt-4o
    python -m allava_jax.synth vflan --records vflan.json --image-root vflan/ --out runs/vflan \\
        --model Qwen2-VL-72B --base-url http://localhost:8000/v1 --concurrency 64
    python -m allava_jax.synth text --questions evol.json --out runs/text --model gpt-4o --batch
    python -m allava_jax.synth images --captions caption.json --out runs/synthvlm --model sd3-medium \\
        --base-url http://localhost:8091/v1 --n 5 --size 1024x1024
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

from .client import FatalAPIError
from .config import SynthConfig
from .items import (
    Item,
    captions_from_file,
    laion_from_folder,
    laion_from_manifest,
    text_from_questions,
    vflan_from_records,
)
from .pipeline import run
from .redact import install_logging, redact, register_env_key


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m allava_jax.synth", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("mode", choices=("laion", "vflan", "text", "images"))
    src = p.add_argument_group("inputs")
    src.add_argument("--images", type=Path, help="laion: folder of images")
    src.add_argument("--manifest", type=Path, help="laion: JSON/JSONL rows {id, image, original_caption?, url?}")
    src.add_argument("--records", type=Path, help="vflan: JSON/JSONL records {id, image, instruction}")
    src.add_argument("--image-root", type=Path, help="folder that record/manifest image paths are relative to")
    src.add_argument("--questions", type=Path, help="text: JSON/JSONL questions {idx, instruction}")
    src.add_argument("--captions", type=Path,
                     help="images: caption records {id, conversations} (first gpt turn) or JSON/JSONL {id, caption}")
    src.add_argument("--image-prefix", default="", help="prefix for the records' image field")
    src.add_argument("--limit", type=int, help="only the first N items")
    p.add_argument("--out", required=True, help="run directory (journal, outputs, failures); may be gs://...")
    p.add_argument("--journal-flush-s", type=float, default=5.0,
                   help="--out on object storage: seconds between journal uploads (a kill -9 loses at most "
                        "this much; those items are requested again)")
    p.add_argument("--model", required=True)
    p.add_argument("--base-url", help="any OpenAI-compatible endpoint (vLLM, SGLang, ...); key from OPENAI_API_KEY")
    r = p.add_argument_group("requests")
    r.add_argument("--max-tokens", type=int, default=2048)
    r.add_argument("--temperature", type=float, default=0.7)
    r.add_argument("--max-side", type=int, default=1024, help="downscale images to this longest side")
    r.add_argument("--jpeg-quality", type=int, default=90)
    r.add_argument("--detail", default="auto", choices=("auto", "low", "high"))
    r.add_argument("--prompts", type=Path, help="folder whose *.txt replace the default prompt files")
    r.add_argument("--seed", type=int, default=0, help="fixes the random question and caption-instruction choices")
    im = p.add_argument_group("images mode (Images API)")
    im.add_argument("--n", type=int, default=5, help="images per caption")
    im.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT (or auto)")
    im.add_argument("--response-format", default="b64_json", choices=("b64_json", "url"),
                    help="how the server returns images (url answers are fetched at once)")
    t = p.add_argument_group("throughput and robustness")
    t.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    t.add_argument("--rpm", type=float, default=0, help="requests/min limit (0 = none)")
    t.add_argument("--tpm", type=float, default=0, help="tokens/min limit (0 = none)")
    t.add_argument("--timeout", type=float, default=120.0, help="seconds per request (SDK timeout)")
    t.add_argument("--max-retries", type=int, default=5, help="SDK retries per request (429/5xx/timeouts)")
    t.add_argument("--max-attempts", type=int, default=3, help="requests per item when the output is malformed")
    t.add_argument("--retry-failed", action="store_true", help="request items in failures.jsonl again")
    c = p.add_argument_group("cost")
    c.add_argument("--prices", type=Path, help="price table JSON (default: allava_jax/synth/prices.json)")
    c.add_argument("--price-in", type=float, help="USD per 1M prompt tokens (overrides the table)")
    c.add_argument("--price-out", type=float, help="USD per 1M completion tokens (overrides the table)")
    c.add_argument("--price-image", type=float, help="images: USD per generated image (overrides the table)")
    c.add_argument("--max-cost", type=float, help="stop launching requests at this many USD")
    c.add_argument("--est-output-tokens", type=int, help="completion tokens per request for estimates")
    c.add_argument("--dry-run", action="store_true", help="print request count and estimated cost; call nothing")
    b = p.add_argument_group("batch API")
    b.add_argument("--batch", action="store_true", help="use the Batch API (upload, create, poll, download)")
    b.add_argument("--batch-size", type=int, default=1000, help="requests per batch")
    b.add_argument("--poll-interval", type=float, default=30.0, help="seconds between batch polls")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (redacted)")
    return p


def load_items(args: argparse.Namespace) -> list[Item]:
    """Items for the chosen mode from the given inputs."""
    if args.mode == "laion":
        if bool(args.images) == bool(args.manifest):
            raise SystemExit("laion needs exactly one of --images DIR or --manifest FILE")
        if args.images:
            return laion_from_folder(args.images, args.image_prefix)
        return laion_from_manifest(args.manifest, args.image_root, args.image_prefix)
    if args.mode == "vflan":
        if not args.records:
            raise SystemExit("vflan needs --records FILE (and --image-root DIR)")
        return vflan_from_records(args.records, args.image_root, args.image_prefix)
    if args.mode == "images":
        if not args.captions:
            raise SystemExit("images needs --captions FILE")
        return captions_from_file(args.captions)
    if not args.questions:
        raise SystemExit("text needs --questions FILE")
    return text_from_questions(args.questions)


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    return SynthConfig(
        mode=args.mode, out=args.out, model=args.model, base_url=args.base_url, max_tokens=args.max_tokens,
        temperature=args.temperature, max_side=args.max_side, jpeg_quality=args.jpeg_quality, detail=args.detail,
        prompts_dir=args.prompts, seed=args.seed, n=args.n, size=args.size, response_format=args.response_format,
        concurrency=args.concurrency, rpm=args.rpm, tpm=args.tpm, timeout=args.timeout,
        max_retries=args.max_retries, max_attempts=args.max_attempts, retry_failed=args.retry_failed,
        limit=args.limit, prices=args.prices, price_in=args.price_in, price_out=args.price_out,
        price_image=args.price_image, max_cost=args.max_cost, est_output_tokens=args.est_output_tokens,
        dry_run=args.dry_run, batch=args.batch, batch_size=args.batch_size, poll_interval=args.poll_interval,
        progress=not args.no_progress, journal_flush_s=args.journal_flush_s)


def _dry_run_line(d: dict, mode: str) -> str:
    flags = "--price-image" if mode == "images" else "--price-in/--price-out"
    cost = f"${d['est_cost']:.4f}" if d["est_cost"] is not None else f"unknown (no price: pass {flags})"
    if mode == "images":
        return (f"dry run: {d['requests']} requests for {d['images']} images ({d['finished']} captions already "
                f"finished); estimated cost {cost}")
    return (f"dry run: {d['requests']} requests ({d['finished']} items already finished); estimated "
            f"{d['est_prompt_tokens']:,} prompt + {d['est_completion_tokens']:,} completion tokens; "
            f"estimated cost {cost}")


def format_summary(summary: dict, mode: str = "laion") -> str:
    if "dry_run" in summary:
        return _dry_run_line(summary["dry_run"], mode)
    used = (f"{summary['images']} images" if mode == "images" else
            f"{summary['prompt_tokens']:,} prompt + {summary['completion_tokens']:,} completion tokens")
    s = (f"synth: {summary['done']} done, {summary['failed']} failed, {summary['pending']} pending; "
         f"{summary['requests']} paid responses, {used}, cost ${summary['cost']:.4f}")
    if summary.get("stopped"):
        s += f"; stopped: {summary['stopped']}"
    return s + "\nfiles: " + json.dumps(summary["files"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    install_logging(logging.DEBUG if args.verbose else logging.INFO)
    register_env_key()
    try:
        summary = run(config_from_args(args), load_items(args))
    except FatalAPIError as e:
        print(redact(f"error: {e}"), file=sys.stderr)
        return 1
    except (RuntimeError, ValueError, OSError) as e:
        print(redact(f"error: {type(e).__name__}: {e}"), file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - anything unexpected: full traceback, but never the key
        print(redact(traceback.format_exc()), file=sys.stderr)
        return 1
    print(format_summary(summary, args.mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
