"""Decode tokens/s: our KV-cache generation vs transformers' generate (the server: ``serve.py``).

    python benchmarks/generate.py [--new-tokens 128] [--threads 2] [--batches 1,8,16] [--repeats 3]

Same mid-size model on both sides (8 layers, hidden 512, vocab 51200, fp32, greedy, random
weights copied through allava_jax.convert), same text prompts, every row generating exactly
``--new-tokens`` tokens. tokens/s counts generated tokens over the whole ``generate`` call
(prefill included, compile excluded: one warm-up call first), the fastest of ``--repeats`` calls
on each side, the two sides' calls interleaved. The machine's fp32 matmul peak is measured in the
same run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from allava_jax.convert import configs as conf  # noqa: E402
from allava_jax.convert import hf  # noqa: E402
from allava_jax.infer.engine import Engine, Prompt  # noqa: E402
from allava_jax.infer.sampling import SamplingParams  # noqa: E402
from allava_jax.models.config import LlavaConfig, TextConfig, VisionConfig  # noqa: E402
from allava_jax.train.flops import measure_matmul_flops  # noqa: E402
from timing import best_times  # noqa: E402

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


def ours_call(engine: Engine, batch: int, new: int) -> Callable[[], Any]:
    """Our batched generate as a call to time (compiled here by a first call)."""
    ps = [Prompt(ids) for ids in prompts(batch)]
    sampling = SamplingParams(max_new_tokens=new)
    out = engine.generate(ps, sampling)  # compile
    assert all(len(c.token_ids) == new for c in out)
    return lambda: engine.generate(ps, sampling)


def hf_call(model, batch: int, new: int) -> Callable[[], Any]:
    """transformers' generate as a call to time (warmed up here by a first call)."""
    ids = torch.tensor(prompts(batch))
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    def call():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)

    assert call().shape[1] - PROMPT_LEN == new
    return call


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batches", default="1,8,16")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case; the fastest counts")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    params = random_params(CONFIG)
    engine = Engine(CONFIG, params, NullTokenizer(), max_len=2048)
    model = hf_model(params, CONFIG)
    print(f"model: 8 layers, hidden 512, vocab 51200, fp32; prompt {PROMPT_LEN} tokens, {args.new_tokens} new tokens, greedy")
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} ({args.threads} threads), "
          f"transformers {transformers.__version__}; fp32 matmul peak {measure_matmul_flops(2048) / 1e9:.0f} GFLOP/s\n")
    print("| case | allava-jax tok/s | transformers tok/s | speed-up |\n| --- | ---: | ---: | ---: |")
    for batch in map(int, args.batches.split(",")):
        calls = [ours_call(engine, batch, args.new_tokens), hf_call(model, batch, args.new_tokens)]
        ours, theirs = (batch * args.new_tokens / seconds for seconds, _ in best_times(calls, args.repeats))
        print(f"| generate, batch {batch} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
