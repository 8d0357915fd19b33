"""``python -m allava_jax.eval --checkpoint DIR --tasks mme,gqa [--include-path DIR] [--limit N]``
and ``python -m allava_jax.eval pairwise ...`` (a judge compares our answers with an anchor's).

Prints lmms-eval's results table to stdout (logs to stderr) and writes the full results JSON to
``--output`` when given. Judge-scored tasks (``mmvet``, ``llava_in_the_wild``) call the judge that
``--judge-model`` / ``--judge-base-url`` name, through lmms-eval's own ``MODEL_VERSION``,
``OPENAI_API_URL`` and ``API_TYPE`` settings; the key is ``OPENAI_API_KEY`` from the environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from allava_jax import storage
from allava_jax.errors import UserError, report_user_errors


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
    p.add_argument("--judge-model", help="judge of GPT-judged tasks (lmms-eval's MODEL_VERSION; its default: gpt-4o-2024-11-20)")
    p.add_argument("--judge-base-url", help="OpenAI-compatible judge endpoint, e.g. http://127.0.0.1:8000/v1 (OPENAI_API_URL)")
    return p


def pairwise_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m allava_jax.eval pairwise",
                                description="Judge our answers against an anchor model's, both orders (Vicuna-80, MLLM-Bench).")
    p.add_argument("--questions", required=True, help="JSONL: question_id, text (or question), optional image, category")
    p.add_argument("--anchor", required=True, help="JSONL of the anchor model's answers: question_id, text (or answer)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="generate our answers with this checkpoint (its chat template)")
    src.add_argument("--answers", help="JSONL of our answers, already generated")
    p.add_argument("--image-root", help="directory the questions' image paths are relative to (default: theirs)")
    p.add_argument("--out", required=True, help="run directory: answers, judge journal, per-item judgements")
    p.add_argument("--judge-model", required=True)
    p.add_argument("--judge-base-url", help="OpenAI-compatible endpoint (default: the SDK's, or OPENAI_BASE_URL)")
    p.add_argument("--prompt", help="judge prompt JSON ({system, user}); default: allava_jax/eval/prompts/pairwise.json")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-attempts", type=int, default=3, help="requests per pair when the verdict is malformed")
    p.add_argument("--judge-max-tokens", type=int, default=1024)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--max-retries", type=int, default=5, help="the SDK's retries of 429 / 5xx / timeouts")
    p.add_argument("--max-cost", type=float, help="stop issuing requests before the spend (USD) would pass this")
    p.add_argument("--price-in", type=float, help="USD per 1M prompt tokens of the judge")
    p.add_argument("--price-out", type=float, help="USD per 1M completion tokens of the judge")
    p.add_argument("--retry-failed", action="store_true", help="request pairs that failed on an earlier run again")
    p.add_argument("--max-new-tokens", type=int, default=512, help="our answers' length limit")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    p.add_argument("--no-progress", action="store_true")
    return p


def pairwise_main(argv: Sequence[str]) -> int:

    from allava_jax.eval import pairwise
    from allava_jax.synth.redact import register_env_key
    from allava_jax.synth.usage import Price

    args = pairwise_parser().parse_args(argv)
    if not register_env_key():
        raise UserError("OPENAI_API_KEY is not set (for a judge server without auth, set it to any value, e.g. EMPTY)")
    storage.check_access(args.out, write=True)
    out = storage.as_path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    questions = pairwise.load_questions(args.questions, args.image_root)
    anchor = pairwise.load_answers(args.anchor)
    prompt = pairwise.load_prompt(args.prompt)
    if args.answers:
        ours = pairwise.load_answers(args.answers)
    else:
        from allava_jax.infer.loading import load_engine

        engine = load_engine(args.checkpoint, dtype=args.dtype)
        ours = pairwise.generate_answers(engine, questions, out / pairwise.ANSWERS_FILE,
                                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    price = None
    if args.price_in is not None or args.price_out is not None:
        price = Price(args.price_in or 0.0, args.price_out or 0.0)
    settings = pairwise.JudgeSettings(
        model=args.judge_model, base_url=args.judge_base_url, concurrency=args.concurrency,
        max_attempts=args.max_attempts, max_tokens=args.judge_max_tokens, timeout=args.timeout,
        max_retries=args.max_retries, max_cost=args.max_cost, price=price)
    summary = pairwise.judge(questions, ours, anchor, out, settings, prompt, retry_failed=args.retry_failed,
                             progress=not args.no_progress)
    print(json.dumps(summary, indent=1))
    return 0 if summary["pending"] == 0 and summary["stopped"] is None else 1


def set_judge_env(model: str | None, base_url: str | None) -> None:
    """lmms-eval's judged tasks read their judge from the environment when they are imported."""
    import os

    if model:
        os.environ["MODEL_VERSION"] = model
    if base_url:
        os.environ["OPENAI_API_URL"] = base_url
        os.environ.setdefault("API_TYPE", "openai")


@report_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if argv[:1] == ["pairwise"]:
        return pairwise_main(argv[1:])
    args = parser().parse_args(argv)
    set_judge_env(args.judge_model, args.judge_base_url)
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
