"""Decode tokens/s: our KV-cache generation vs transformers' generate; server throughput.

    python benchmarks/generate.py [--new-tokens 128] [--threads 2] [--requests-per-client 2]

Same mid-size model on both sides (8 layers, hidden 512, vocab 51200, fp32, greedy, random
weights copied through allava_jax.convert), same text prompts, every row generating exactly
``--new-tokens`` tokens. tokens/s counts generated tokens over the whole ``generate`` call
(prefill included, compile excluded: one warm-up call first). The server row runs the real
uvicorn app with 16 concurrent clients of the official ``openai`` client.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from allava_jax.convert import configs as conf  # noqa: E402
from allava_jax.convert import hf  # noqa: E402
from allava_jax.infer.engine import Engine, Prompt  # noqa: E402
from allava_jax.infer.sampling import SamplingParams  # noqa: E402
from allava_jax.models.config import LlavaConfig, TextConfig, VisionConfig  # noqa: E402

CONFIG = LlavaConfig(
    vision=VisionConfig(image_size=56, patch_size=14, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4),
    text=TextConfig(vocab_size=51200, hidden_size=512, intermediate_size=2048, num_layers=8, num_heads=8, partial_rotary_factor=0.5, lm_head_bias=False),
    image_token_id=51199,
)
PROMPT_LEN = 32


class NullTokenizer:
    """Generation never hits EOS (id -1) and text is not needed for timing."""

    eos_token_id = -1

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


def random_params(config: LlavaConfig, seed: int = 0) -> dict:
    import flax.linen as nn

    from allava_jax.models import abstract_params

    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.02).astype(np.float32), nn.unbox(abstract_params(config)))


def hf_model(params: dict, config: LlavaConfig) -> transformers.LlavaForConditionalGeneration:
    d = conf.llava_to_hf(config)
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**d["vision_config"]),
        text_config=transformers.PhiConfig(**d["text_config"]),
        image_token_index=d["image_token_index"],
    )
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in hf.export_tensors(params, config, hf.HF_LLAVA)})
    return model


def prompts(batch: int) -> list[list[int]]:
    rng = np.random.default_rng(batch)
    return [rng.integers(0, 50000, PROMPT_LEN).tolist() for _ in range(batch)]


def time_ours(engine: Engine, batch: int, new: int) -> float:
    ps = [Prompt(ids) for ids in prompts(batch)]
    sampling = SamplingParams(max_new_tokens=new)
    engine.generate(ps, sampling)  # compile
    start = time.perf_counter()
    out = engine.generate(ps, sampling)
    elapsed = time.perf_counter() - start
    assert all(len(c.token_ids) == new for c in out)
    return batch * new / elapsed


def time_hf(model, batch: int, new: int) -> float:
    ids = torch.tensor(prompts(batch))
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(input_ids=ids[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm up
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        elapsed = time.perf_counter() - start
    assert out.shape[1] - PROMPT_LEN == new
    return batch * new / elapsed


def server_throughput(engine: Engine, clients: int, per_client: int, new: int) -> tuple[float, float]:
    """(generated tokens/s over all clients, median request latency in s) through HTTP."""
    import openai
    import uvicorn

    from allava_jax.infer.openai_api import ServerLimits
    from allava_jax.infer.scheduler import Scheduler
    from allava_jax.infer.server import create_app

    class CharTokenizer(NullTokenizer):
        eos_token_id = -1

        def decode(self, ids, skip_special_tokens=True) -> str:
            return "".join(chr(65 + i % 26) for i in ids)

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(ch) % 50000 for ch in text]}

    class Backend:  # the `tokenizers`-style object templates.tokenize_parts calls
        @staticmethod
        def encode(text, add_special_tokens=False):
            return type("Enc", (), {"ids": [ord(ch) % 50000 for ch in text]})()

    tok = CharTokenizer()
    tok.backend_tokenizer = Backend()
    server_engine = Engine(engine.config, engine.params, tok)
    scheduler = Scheduler(server_engine, max_batch=clients, max_len=512).start()
    app = create_app(scheduler, "bench", ServerLimits(max_new_tokens=new))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", log_config=None))
    threading.Thread(target=uv.run, daemon=True).start()
    while not uv.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)

    def one(i: int) -> tuple[int, float]:
        start = time.perf_counter()
        r = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": f"question number {i} " * 2}], max_tokens=new)
        return r.usage.completion_tokens, time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:  # warm up every batch bucket
        list(pool.map(one, range(clients)))
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients * per_client)))
    elapsed = time.perf_counter() - start
    uv.should_exit = True
    scheduler.stop()
    return sum(n for n, _ in results) / elapsed, float(np.median([t for _, t in results]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests-per-client", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    params = random_params(CONFIG)
    engine = Engine(CONFIG, params, NullTokenizer(), max_len=2048)
    model = hf_model(params, CONFIG)
    print(f"model: 8 layers, hidden 512, vocab 51200, fp32; prompt {PROMPT_LEN} tokens, {args.new_tokens} new tokens, greedy")
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} ({args.threads} threads), transformers {transformers.__version__}\n")
    print("| case | allava-jax tok/s | transformers tok/s | speed-up |\n| --- | ---: | ---: | ---: |")
    for batch in (1, 8):
        ours, theirs = time_ours(engine, batch, args.new_tokens), time_hf(model, batch, args.new_tokens)
        print(f"| generate, batch {batch} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.1f}x |", flush=True)
    tps, latency = server_throughput(engine, args.clients, args.requests_per_client, args.new_tokens // 2)
    print(f"| server, {args.clients} concurrent clients ({args.new_tokens // 2} tokens each) | {tps:.0f} | n/a | median latency {latency:.2f}s |")


if __name__ == "__main__":
    main()
