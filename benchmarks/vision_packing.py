"""RICE-ViT throughput on a mix of image sizes: all images packed in one sequence (per-image
segment ids) vs each image padded to the largest, and vs transformers' ``MLCDVisionModel`` image
by image, on the same weights.

    python benchmarks/vision_packing.py [--layers 4] [--sizes 224x224,448x336,140x560,336x168,280x280]
                                        [--repeats 3] [--threads 2]

Packed, XLA attention scores each block of 128 patches against a window spanning the images it
touches (plus the class tokens), not the whole row (``Attention._attend_windows``).

The tower is RICE-ViT-L/14's width (hidden 1024, 16 heads, MLP 4096; ``--layers`` of its 24, to
keep a CPU run short: every variant scales with the layer count alike). Images are random, sized
by ``smart_resize`` (multiples of 28) from the ``--sizes`` given as WxH. Figures are vision tokens
(real patches) per second, the fastest of ``--repeats`` calls, calls interleaved; XLA (fp32) for
ours, PyTorch fp32 with ``--threads`` threads for transformers. Outputs are checked against
transformers' before timing. "model GFLOP/s" counts the tower's useful work (each image's patches
and class token, attention within the image) per second, the same for every variant; the two
fp32 matmul peaks bound what either side can reach.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from allava_jax.convert import hf  # noqa: E402
from allava_jax.data import native  # noqa: E402
from allava_jax.models import abstract_params, get_preset, rice  # noqa: E402
from allava_jax.train import flops  # noqa: E402
from allava_jax.train.flops import measure_matmul_flops  # noqa: E402
from timing import best_times  # noqa: E402


def tower(layers: int, seed: int = 0):
    """A random MLCD tower of RICE-ViT-L's width and our params of the same weights."""
    config = get_preset("llava_ov15_4b").replace(vision={"num_layers": layers},
                                                text={"num_layers": 1, "vocab_size": 256, "hidden_size": 64,
                                                      "intermediate_size": 64, "explicit_head_dim": 16, "num_heads": 4,
                                                      "num_kv_heads": 2}, image_token_id=255)
    v = config.vision
    mlcd = transformers.MLCDVisionModel(transformers.MLCDVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=layers,
        num_attention_heads=v.num_heads, patch_size=v.patch_size)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mlcd.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    state = {k: t.detach().numpy() for k, t in mlcd.state_dict().items()}
    shapes = nn.unbox(abstract_params(config))
    params = hf.load_params(state.__getitem__, config, hf.Layout("", "", "", ""), shapes, skip=lambda p: p[0] != "vision")
    return v, mlcd, params["vision"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--sizes", default="224x224,448x336,140x560,336x168,280x280")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    vision, mlcd, params = tower(args.layers)
    rng = np.random.default_rng(0)
    images = []
    for size in args.sizes.split(","):
        w, h = map(int, size.split("x"))
        rh, rw = native.smart_resize(h, w)
        pixels = rng.standard_normal((rh, rw, 3)).astype(np.float32)
        images.append((native.patchify(pixels), (rh // 14, rw // 14), pixels))
    n_real = sum(len(x) for x, _, _ in images)
    largest = max(len(x) for x, _, _ in images)

    packed = {k: jnp.asarray(v) for k, v in rice.pack_images([[(x, g) for x, g, _ in images]],
                                                             rice.Buckets(128, len(images))).items()}
    # One row per image, each padded to the largest (one attention block: the whole row).
    padded = {k: jnp.asarray(v) for k, v in rice.pack_images([[(x, g)] for x, g, _ in images],
                                                             rice.Buckets(largest, 1)).items()}
    apply = jax.jit(rice.RiceVision(vision, attention="xla").apply)
    run_packed = lambda: apply({"params": params}, packed).block_until_ready()  # noqa: E731
    run_padded = lambda: apply({"params": params}, padded).block_until_ready()  # noqa: E731

    def run_hf():
        with torch.no_grad():
            return [mlcd(torch.from_numpy(px.transpose(2, 0, 1))[None]).last_hidden_state for _, _, px in images]

    # Same numbers: each image's features from the packed row vs transformers' (reordered).
    out, ref, at, worst = np.asarray(run_packed()[0]), run_hf(), 0, 0.0
    for (x, (gh, gw), _), r in zip(images, ref):
        want = r[0, 1:].numpy()[rice.block_order(gh, gw)]
        worst = max(worst, float(np.abs(out[at:at + len(x)] - want).max()))
        at += len(x)
    run_padded()
    (t_packed, _), (t_padded, _), (t_hf, _) = best_times([run_packed, run_padded, run_hf], args.repeats)
    peak = measure_matmul_flops(2048)
    torch_peak = torch_matmul_flops(2048)
    # The model FLOPs all three variants do usefully (no padding, no masked scores counted).
    work = flops.vision_forward_flops(vision, [len(x) for x, _, _ in images])
    print(f"{len(images)} images ({args.sizes}) -> {n_real} patches (largest {largest}); RICE-ViT-L width, "
          f"{args.layers} layers; packed row {packed['patches'].shape[1]} + {packed['cls_segments'].shape[1]} tokens, "
          f"padded {padded['patches'].shape[0]} x ({padded['patches'].shape[1]} + 1); max |packed - transformers| = "
          f"{worst:.1e}; {work / 1e9:.1f} GFLOP of model work; fp32 2048^3 matmul peak: XLA {peak / 1e9:.0f}, "
          f"torch {torch_peak / 1e9:.0f} GFLOP/s\n")
    print("| variant | s per batch | vision tokens/s | model GFLOP/s | of the XLA peak | vs transformers |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, t in (("ours, packed in one sequence", t_packed), ("ours, each padded to the largest", t_padded),
                    (f"transformers MLCDVisionModel, image by image ({args.threads} threads)", t_hf)):
        print(f"| {name} | {t:.3f} | {n_real / t:,.0f} | {work / t / 1e9:.0f} | {work / t / peak:.0%} | {t_hf / t:.2f}x |")


def torch_matmul_flops(n: int, repeats: int = 5) -> float:
    """PyTorch's fp32 matmul rate at n^3 (oneDNN): the ceiling of transformers' side."""
    a = torch.ones(n, n)
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


if __name__ == "__main__":
    main()
