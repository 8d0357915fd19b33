"""Generation with a KV cache that grows with the answers vs one sized for max_new_tokens up front.

    python benchmarks/cache_growth.py [--prompt-len 600] [--max-new-tokens 1024] [--answer-len 40]
                                      [--batches 1,8] [--repeats 3]

The model of ``generate.py`` (8 layers, hidden 512, fp32). Prompts of ``--prompt-len`` random tokens
(an ALLaVA image prompt is ~600: 576 image tokens and the question), ``--max-new-tokens`` as an
evaluation harness sets it, and answers that end early: random weights never pick EOS, so every
``--answer-len``-th token id is made a stop id and tokens are sampled (temperature 1, one seed per
row), which ends an answer after about ``--answer-len`` tokens. Both engines must return the same
tokens; each figure is the fastest of ``--repeats`` calls, the two engines' calls interleaved.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from allava_jax.infer.engine import Engine, Prompt  # noqa: E402
from allava_jax.infer.sampling import SamplingParams  # noqa: E402
from allava_jax.train.flops import measure_matmul_flops  # noqa: E402
from generate import CONFIG, NullTokenizer, random_params  # noqa: E402
from timing import best_times  # noqa: E402


class FullCacheEngine(Engine):
    """The engine as it was: a cache of every slot the longest answer can need, from the start."""

    @staticmethod
    def cache_slots(needed: int, full: int) -> int:
        return full


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompt-len", type=int, default=600)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--answer-len", type=int, default=40)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    params, stops = random_params(CONFIG), list(range(7, CONFIG.text.vocab_size - 1, args.answer_len))
    engines = [cls(CONFIG, params, NullTokenizer(), max_len=4096, stop_token_ids=stops) for cls in (Engine, FullCacheEngine)]
    print(f"prompt {args.prompt_len} tokens, max_new_tokens {args.max_new_tokens}, answers ending after ~{args.answer_len} "
          f"tokens; fp32 matmul peak {measure_matmul_flops(2048) / 1e9:.0f} GFLOP/s\n")
    print("| batch | answer lengths | growing cache s | full-size cache s | speed-up |\n| ---: | --- | ---: | ---: | ---: |")
    rng = np.random.default_rng(0)
    for batch in map(int, args.batches.split(",")):
        prompts = [Prompt(rng.integers(0, 50000, args.prompt_len).tolist()) for _ in range(batch)]
        sampling = [SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=r + 1) for r in range(batch)]
        outs = [e.generate(prompts, sampling) for e in engines]  # compiles
        answers = [[c.token_ids for c in out] for out in outs]
        assert answers[0] == answers[1], "the two caches gave different tokens"
        (grown, _), (full, _) = best_times([lambda e=e: e.generate(prompts, sampling) for e in engines], args.repeats)
        lengths = ", ".join(str(len(a)) for a in answers[0])
        print(f"| {batch} | {lengths} | {grown:.2f} | {full:.2f} | {full / grown:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
