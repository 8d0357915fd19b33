"""The server measured the way ``vllm bench serve`` measures one, beside offline batched ``generate``.

    python benchmarks/serve.py [--num-prompts 48] [--rates 1,4,inf] [--max-concurrency 16]
        [--output-len 64] [--decode-steps 16]

The model of ``generate.py`` (8 layers, hidden 512, vocab 51200, fp32, random weights) behind the
real uvicorn app on 127.0.0.1, a character-level tokenizer, and streamed chat completions from the
official ``openai`` async client (vLLM's benchmark uses aiohttp; both read SSE chunks). As
``vllm bench serve`` does:

- requests arrive as a Poisson process at each ``--rates`` value (``inf``: all at once), and one
  more run keeps ``--max-concurrency`` requests in flight (closed loop, all sent at once);
- every request asks for exactly ``--output-len`` tokens (``ignore_eos``), greedy;
- TTFT is the time to the first chunk with content; ITL the gaps between later content chunks
  (one chunk may carry several tokens: one decode dispatch); TPOT per request
  ``(latency - TTFT) / (output tokens - 1)``; output tokens/s over the whole run.

The last table row is offline ``Engine.generate`` at batch ``--max-concurrency`` on the same
prompts, and the ratio column is each run's output tokens/s against it. The target TTFT bound
printed is one batched prefill plus one decode chunk, measured offline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import openai  # noqa: E402

from allava_jax.infer.engine import Engine  # noqa: E402
from allava_jax.infer.sampling import SamplingParams  # noqa: E402
from allava_jax.infer.scheduler import DECODE_STEPS, Scheduler  # noqa: E402
from allava_jax.train.flops import measure_matmul_flops  # noqa: E402
from generate import CONFIG, random_params  # noqa: E402

PROMPT_CHARS = 24  # + the chat template's tokens: ~34 prompt tokens, as generate.py's 32


class CharTokenizer:
    """One token per character (ids 65..); nothing is ever EOS. Enough for the server's prompts."""

    eos_token_id = -1

    def __init__(self) -> None:
        self.backend_tokenizer = self  # templates.tokenize_parts calls backend_tokenizer.encode

    def encode(self, text: str, add_special_tokens: bool = False):
        return type("Encoding", (), {"ids": [ord(ch) % 50000 for ch in text]})()

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(ch) % 50000 for ch in text]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(65 + i % 26) for i in ids)


def prompt_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(chr(97 + c) for c in rng.integers(0, 26, PROMPT_CHARS)) for _ in range(n)]


async def one_request(client: openai.AsyncOpenAI, text: str, output_len: int) -> dict:
    """One streamed request: its TTFT, chunk gaps, latency and output tokens."""
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": text}], max_tokens=output_len, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, temperature=0.0,
    )
    arrivals, tokens = [], 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    ttft = arrivals[0] - start
    return {"ttft": ttft, "itl": np.diff(arrivals).tolist(), "latency": end - start, "tokens": tokens,
            "tpot": (end - start - ttft) / max(tokens - 1, 1)}


async def run(url: str, texts: list[str], output_len: int, rate: float, concurrency: int | None, seed: int) -> dict:
    """All ``texts`` as requests: Poisson arrivals at ``rate``/s (inf: at once), at most ``concurrency`` in flight."""
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency or len(texts))
    rng = np.random.default_rng(seed)

    async def gated(text: str) -> dict:
        async with gate:
            return await one_request(client, text, output_len)

    start = time.perf_counter()
    tasks = []
    for text in texts:
        tasks.append(asyncio.create_task(gated(text)))
        if np.isfinite(rate):
            await asyncio.sleep(rng.exponential(1.0 / rate))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    await client.close()
    return {"results": results, "duration": duration}


def summary(outcome: dict) -> dict:
    res = outcome["results"]
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3 if len(xs) else float("nan")  # noqa: E731
    ttft = [r["ttft"] for r in res]
    tpot = [r["tpot"] for r in res]
    itl = [x for r in res for x in r["itl"]]
    return {
        "tok_s": sum(r["tokens"] for r in res) / outcome["duration"],
        "ttft50": pct(ttft, 50), "ttft99": pct(ttft, 99), "tpot50": pct(tpot, 50), "tpot99": pct(tpot, 99),
        "itl50": pct(itl, 50), "itl99": pct(itl, 99), "failed": sum(r["tokens"] == 0 for r in res),
    }


def start_server(engine: Engine, max_batch: int, decode_steps: int) -> tuple[str, Scheduler, object]:
    import uvicorn

    from allava_jax.infer.openai_api import ServerLimits
    from allava_jax.infer.server import create_app

    scheduler = Scheduler(engine, max_batch=max_batch, max_len=512, decode_steps=decode_steps).start()
    app = create_app(scheduler, "bench", ServerLimits(max_new_tokens=512, max_n=max_batch))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", log_config=None))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", scheduler, server


def offline(engine: Engine, texts: list[str], output_len: int) -> tuple[float, float]:
    """(tokens/s of batched ``generate`` on the server's prompts, seconds of its prefill alone)."""
    from allava_jax.infer import openai_api as api

    prompts = []
    for text in texts:
        rounds, images = api.parse_messages([{"role": "user", "content": text}], api.ServerLimits(), CONFIG.vision.image_size)
        prompts.append(api.build_prompt(engine, rounds, images))
    sampling = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    timed = []
    for new in (1, output_len):
        s = SamplingParams(max_new_tokens=new, ignore_eos=True)
        engine.generate(prompts, s)  # compile
        start = time.perf_counter()
        out = engine.generate(prompts, s)
        timed.append(time.perf_counter() - start)
        assert all(len(c.token_ids) == new for c in out), sampling
    return len(texts) * output_len / timed[1], timed[0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--rates", default="1,4,inf", help="Poisson request rates per second; inf: all at once")
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--decode-steps", type=int, default=DECODE_STEPS)
    args = p.parse_args()
    peak = measure_matmul_flops(2048) / 1e9
    engine = Engine(CONFIG, random_params(CONFIG), CharTokenizer(), max_len=512)
    batch = args.max_concurrency
    offline_tps, prefill_s = offline(engine, prompt_texts(batch, seed=99), args.output_len)
    step_s = batch * 1.0 / offline_tps  # seconds per decode step at this batch (prefill included: an upper bound)
    url, scheduler, server = start_server(engine, batch, args.decode_steps)
    texts = prompt_texts(args.num_prompts)
    for size in (1, 2, 4, 8, 16, batch):  # compile every prefill batch bucket before timing
        asyncio.run(run(url, texts[:size], 4, float("inf"), None, 0))
    runs = [(f"Poisson {r}/s", float(r), None) for r in args.rates.split(",")]
    runs.append((f"max concurrency {batch}", float("inf"), batch))
    print(f"model: generate.py's (8 layers, hidden 512, vocab 51200, fp32); {args.num_prompts} requests, "
          f"~{PROMPT_CHARS + 10}-token prompts, {args.output_len} output tokens each, greedy, decode steps per dispatch "
          f"{args.decode_steps}; fp32 matmul peak {peak:.0f} GFLOP/s")
    print(f"offline: batched generate at batch {batch}: {offline_tps:.0f} tok/s; its prefill {prefill_s * 1e3:.0f} ms; "
          f"one prefill + one decode chunk <= {(prefill_s + args.decode_steps * step_s) * 1e3:.0f} ms\n")
    print("| run | output tok/s | vs generate | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms | failed |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, rate, concurrency in runs:
        s = summary(asyncio.run(run(url, texts, args.output_len, rate, concurrency, seed=1)))
        print(f"| {name} | {s['tok_s']:.0f} | {s['tok_s'] / offline_tps:.2f}x | {s['ttft50']:.0f} / {s['ttft99']:.0f} | "
              f"{s['tpot50']:.1f} / {s['tpot99']:.1f} | {s['itl50']:.0f} / {s['itl99']:.0f} | {s['failed']} |", flush=True)
    print(f"| offline generate, batch {batch} | {offline_tps:.0f} | 1.00x | | | | |")
    server.should_exit = True
    scheduler.stop()


if __name__ == "__main__":
    main()
