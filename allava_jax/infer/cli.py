"""Command lines for ``python -m allava_jax.generate`` and ``python -m allava_jax.serve``.

Logs go to stderr; ``generate`` prints the answer alone to stdout so it can be piped.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence


from allava_jax import storage
from allava_jax.errors import UserError, report_user_errors


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint directory written by `convert import` or training")
    p.add_argument("--tokenizer", help="tokenizer directory (default: <checkpoint>/tokenizer)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the checkpoint's)")
    p.add_argument("--max-len", type=int, help="prompt + answer token limit (default: model max positions)")
    p.add_argument("--max-pixels", type=int, help="native-resolution models: the largest resized image area "
                   "(default: the checkpoint's, e.g. 2560000: up to 3265 tokens); bounds what one image costs")
    p.add_argument("--compile-cache-dir", help="JAX's persistent compilation cache, local or gs:// "
                   "(default: ~/.cache/allava_jax/jax_compile; '' = off)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m allava_jax.generate", description="Answer a prompt (with images) from a checkpoint.")
    _model_args(p)
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("--prompt", help="the question (required unless --chat)")
    p.add_argument("--chat", action="store_true", help="multi-turn chat on the terminal (/reset, /exit)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    return p


@report_user_errors
def generate_main(argv: Sequence[str] | None = None) -> int:
    args = generate_parser().parse_args(argv)
    if not args.chat and args.prompt is None:
        generate_parser().error("--prompt is required unless --chat")
    _setup_logging(args.verbose)
    from allava_jax.infer import media
    from allava_jax.infer.loading import load_engine
    from allava_jax.infer.prompts import single_turn
    from allava_jax.infer.sampling import SamplingParams

    sampling = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed, tuple(args.stop))
    engine = load_engine(args.checkpoint, tokenizer=args.tokenizer, dtype=args.dtype, max_len=args.max_len,
                         max_pixels=args.max_pixels, compile_cache_dir=args.compile_cache_dir)
    images = [media.load_file(path, engine.config.vision) for path in args.image]
    pixels = media.stack(images, engine.config.vision)

    def answer(rounds) -> str:
        return engine.generate([engine.prompt(rounds, pixels)], sampling)[0].text

    if not args.chat:
        print(answer(single_turn(args.prompt, len(images))))
        return 0
    history: list[tuple[str, str | None]] = []
    while True:
        try:
            print("user> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            break
        if not line or line.strip() == "/exit":
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            history = []
            continue
        if not text.strip():
            continue
        turn = single_turn(text, len(images))[0] if not history else (text, None)
        try:
            reply = answer(history + [turn])
        except UserError as e:  # e.g. the conversation outgrew the context: start over
            print(f"error: {e} (use /reset)", file=sys.stderr)
            continue
        print(reply, flush=True)
        history.append((turn[0], reply))
    return 0


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m allava_jax.serve", description="OpenAI-compatible chat completions server.")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="model id clients must send (default: the checkpoint directory name)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together; also the largest n of a request")
    p.add_argument("--decode-steps", type=int, default=None,
                   help="decode steps per dispatch (default 16): a streamed answer arrives in chunks of up to this many "
                        "tokens; a chunk ends early when a new request waits and a slot is free")
    p.add_argument("--max-images", type=int, default=8, help="images allowed per request (MMMU items have up to 7)")
    p.add_argument("--max-tokens", type=int, default=512, help="default and cap for max_tokens")
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (off: data URLs only)")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling before accepting requests")
    return p


@report_user_errors
def serve_main(argv: Sequence[str] | None = None) -> int:
    args = serve_parser().parse_args(argv)
    _setup_logging(True)
    import uvicorn

    from allava_jax.infer.loading import load_engine
    from allava_jax.infer.openai_api import ServerLimits
    from allava_jax.infer.scheduler import Scheduler
    from allava_jax.infer.server import create_app

    engine = load_engine(args.checkpoint, tokenizer=args.tokenizer, dtype=args.dtype, max_len=args.max_len,
                         max_pixels=args.max_pixels, compile_cache_dir=args.compile_cache_dir)
    scheduler = Scheduler(engine, max_batch=args.max_batch, decode_steps=args.decode_steps).start()
    if not args.no_warmup:
        scheduler.warmup()
    name = args.model_name or (storage.as_path(args.checkpoint) if storage.is_remote(args.checkpoint)
                                else Path(args.checkpoint).absolute()).name
    limits = ServerLimits(max_images=args.max_images, max_new_tokens=args.max_tokens, max_n=args.max_batch,
                          allow_remote_images=args.allow_remote_images)
    app = create_app(scheduler, name, limits)
    logging.getLogger(__name__).info("serving %r on http://%s:%d/v1", name, args.host, args.port)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        scheduler.stop()
    return 0
