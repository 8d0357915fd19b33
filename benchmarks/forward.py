"""Forward tokens/s: our Flax model vs transformers' LlavaForConditionalGeneration, same weights.

    python benchmarks/forward.py [--repeats 5] [--threads 2]

Both sides fp32 on this CPU, same config, same weights (copied through allava_jax.convert), same
inputs (images + text). Prints one table; tokens = every position of the sequence (image + text).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from allava_jax.convert import configs as conf  # noqa: E402
from allava_jax.convert import hf  # noqa: E402
from allava_jax.models import Llava, abstract_params  # noqa: E402
from allava_jax.models.config import LlavaConfig, TextConfig, VisionConfig  # noqa: E402

import flax.linen as nn  # noqa: E402

CASES = {
    # name: (config, batch, images per row, text tokens per row)
    "tiny": (
        LlavaConfig(
            vision=VisionConfig(image_size=56, patch_size=14, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4),
            text=TextConfig(
                vocab_size=1024, hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4, lm_head_bias=False
            ),
            image_token_id=1000,
        ),
        4,
        1,
        48,
    ),
    "mid": (
        LlavaConfig(
            vision=VisionConfig(image_size=224, patch_size=14, hidden_size=512, intermediate_size=2048, num_layers=8, num_heads=8),
            text=TextConfig(
                vocab_size=51200,
                hidden_size=512,
                intermediate_size=2048,
                num_layers=8,
                num_heads=8,
                partial_rotary_factor=0.5,  # 0.4 * head_dim 64 is odd; HF needs an even rotary dim
                lm_head_bias=False,
            ),
            image_token_id=50295,
        ),
        1,
        2,
        512,
    ),
}


def build_torch(config: LlavaConfig) -> transformers.LlavaForConditionalGeneration:
    d = conf.llava_to_hf(config)
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**d["vision_config"]),
        text_config=transformers.PhiConfig(**d["text_config"]),
        image_token_index=config.image_token_id,
    )
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(cfg).eval()


def inputs(config: LlavaConfig, batch: int, n_images: int, n_text: int):
    rng = np.random.default_rng(0)
    row = []
    for _ in range(n_images):
        row += [config.image_token_id] * config.num_image_tokens
    row += rng.integers(0, config.image_token_id, n_text).tolist()
    ids = np.asarray([row] * batch, np.int64)
    size = config.vision.image_size
    pixels = rng.standard_normal((batch * n_images, 3, size, size)).astype(np.float32)
    return ids, pixels


def timed(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run_case(name: str, repeats: int) -> dict:
    config, batch, n_images, n_text = CASES[name]
    model = build_torch(config)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    shapes = nn.unbox(abstract_params(config))
    params = jax.device_put(hf.load_params(state.__getitem__, config, hf.HF_LLAVA, shapes))
    ids, pixels = inputs(config, batch, n_images, n_text)

    t_ids, t_pix = torch.from_numpy(ids), torch.from_numpy(pixels)

    def torch_forward():
        with torch.inference_mode():
            return model(input_ids=t_ids, pixel_values=t_pix, logits_to_keep=0).logits

    images = jnp.asarray(pixels.reshape(batch, n_images, 3, *pixels.shape[2:]).transpose(0, 1, 3, 4, 2))
    mask = jnp.ones((batch, n_images), bool)
    tokens = jnp.asarray(ids, jnp.int32)
    apply = jax.jit(Llava(config).apply)

    def jax_forward():
        return apply({"params": params}, tokens, images, mask).block_until_ready()

    diff = float(np.abs(np.asarray(jax_forward()) - torch_forward().numpy()).max())
    t_torch, t_jax = timed(torch_forward, repeats), timed(jax_forward, repeats)
    n_tokens = ids.size
    return {
        "case": name,
        "tokens/step": n_tokens,
        "torch tok/s": n_tokens / t_torch,
        "ours tok/s": n_tokens / t_jax,
        "ratio": t_torch / t_jax,
        "max |diff|": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--cases", default="tiny,mid")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    jax.config.update("jax_default_matmul_precision", "highest")
    rows = [run_case(name, args.repeats) for name in args.cases.split(",")]
    print(f"\njax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, {args.threads} threads, fp32")
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [f"{v:.3g}" if isinstance(v, float) and k == "max |diff|" else f"{v:,.0f}" if isinstance(v, float) and k != "ratio" else f"{v:.2f}x" if k == "ratio" else str(v) for k, v in r.items()]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
