"""Train-step throughput: our jitted step vs transformers' LlavaForConditionalGeneration + AdamW.

    python benchmarks/train_step.py [--samples 96] [--seq-len 1024] [--rows 2] [--torch-batch 4]

Same "mid" model both sides (benchmarks/forward.py: 8 layers, hidden 512 in both towers, 224 px,
256 image tokens, vocab 51200), same weights (ours, copied into torch through
allava_jax.convert.hf.export_tensors), same samples, fp32, this CPU, vision tower frozen on both
sides (torch: requires_grad False; ours: param rule ("vision/.*", None)), AdamW lr 2e-5, wd 0,
grad clip 1.0 on both sides.

Samples look like ALLaVA's: 85 % have one image (256 placeholder tokens) + 50-400 text tokens,
15 % are text only (50-400 tokens); the loss is on the second half of the text (the "answer").

(a) end to end, each side fed its own way, over all samples, timed after one warm-up step:
    ours = grain best-fit packing (allava_jax.data.packing) into rows of --seq-len, --rows rows per
    step; torch = LLaVA's modality + length grouped batches of --torch-batch samples, each padded
    to its longest sample. Batch building is inside the timed region on both sides. The sides
    run one after the other (alternating their steps slowed torch ~2x: the runtimes' threads contend).
    Also ours on an offline plan (allava_jax.data.binpack "best", rows built as the "offline"
    pipeline builds them: allava_jax.data.offline.concat_row + FinalizeRow) at each of
    --offline-row-lens, --offline-tokens tokens per step (rows = tokens / row length) and
    row length / 512 image slots per row; planning and row building are timed with the steps.
    Longer rows pack tighter but cost more attention per token.
(b) pure step speed: one identical padded multimodal batch (the same tensors both sides), best of
    --repeats after a warm-up step; the warm-up step's losses (same weights, same batch) are
    compared as a check that the two sides compute the same thing.

Tokens/s counts real tokens only (image placeholders + text, no padding). MFU = model FLOPs
(allava_jax.train.flops.train_step_flops over real tokens, the LM head counted on the loss
positions only, as the loss needs no other logits; the same formula both sides) / time / the
measured fp32 matmul peak of this CPU (allava_jax.train.flops.measure_matmul_flops, the better of
n=1024 and n=2048).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from allava_jax import hugepages  # noqa: E402

hugepages.reexec_with_hugepages()  # as the trainer does; torch's allocations get huge pages too

import flax.linen as nn  # noqa: E402
import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from allava_jax.convert import hf  # noqa: E402
from allava_jax.data import images as images_lib  # noqa: E402
from allava_jax.data import binpack, offline, packing  # noqa: E402
from allava_jax.data import quality  # noqa: E402
from allava_jax.data.pipeline import to_global_batch  # noqa: E402
from allava_jax.train import flops as flops_lib  # noqa: E402
from allava_jax.train.config import base_config  # noqa: E402
from allava_jax.train.loop import setup_step  # noqa: E402
from allava_jax.train.sharding import DEFAULT_RULES, make_mesh  # noqa: E402
from allava_jax.train.state import create_state  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_forward", Path(__file__).with_name("forward.py"))
_forward = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_forward)
# Ours runs its layers unrolled (scan_layers=False), the trainer's CPU setting; the weights
# and the computation are the same as the scan's.
CONFIG = _forward.CASES["mid"][0].replace(scan_layers=False)
build_torch = _forward.build_torch

PARAM_RULES = [("vision/.*", None), (".*", 1.0)]
# Image slots per packed row (--image-slots): 2 packs these samples exactly as tightly as 3 (a third
# image sample of >= 306 tokens rarely fits beside two), and 86 % of the slots hold an image.
MAX_IMAGES_PER_ROW = 2


# ---------------------------------------------------------------------------------------------
# samples


def make_samples(n: int, seed: int = 0) -> list[dict]:
    """ALLaVA-like samples: tokens, targets (shifted within the sample), loss_mask, uint8 images."""
    rng = np.random.default_rng(seed)
    c = CONFIG
    size = c.vision.image_size
    out = []
    for _ in range(n):
        has_image = rng.random() < 0.85
        n_text = int(rng.integers(50, 401))
        text = rng.integers(1, c.image_token_id, n_text)
        tokens = np.concatenate([np.full(c.num_image_tokens if has_image else 0, c.image_token_id), text]).astype(np.int32)
        t = len(tokens)
        targets = np.zeros(t, np.int32)
        targets[:-1] = tokens[1:]
        answer_start = t - n_text // 2  # first answer token
        loss_mask = np.zeros(t, bool)
        loss_mask[answer_start - 1 : t - 1] = True  # positions whose *next* token is an answer token
        imgs = rng.integers(0, 256, (1 if has_image else 0, size, size, 3), dtype=np.uint8)
        skipped = np.zeros(len(quality.REASONS) + 1, np.int64)
        skipped[-1] = 1
        out.append({"tokens": tokens, "targets": targets, "loss_mask": loss_mask, "images": imgs, "skipped": skipped})
    return out


BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions", "images", "image_mask")


def packed_batches(samples: list[dict], seq_len: int, rows: int) -> list[dict[str, np.ndarray]]:
    """The project's packer (grain best-fit + FinalizeRow), batched; the short last batch is padded
    with empty rows (segment 0) so every step has one shape."""
    ds = grain.MapDataset.source(samples).to_iter_dataset()
    ds = packing.pack(ds, method="best_fit", seq_len=seq_len, max_images=MAX_IMAGES_PER_ROW, num_bins=128, seed=0)
    ds = ds.map(packing.FinalizeRow(max_images=MAX_IMAGES_PER_ROW, image_size=CONFIG.vision.image_size))
    return _batched([{k: r[k] for k in BATCH_KEYS} for r in ds], rows)


def _batched(row_list: list[dict[str, np.ndarray]], rows: int) -> list[dict[str, np.ndarray]]:
    batches = []
    for i in range(0, len(row_list), rows):
        chunk = row_list[i : i + rows]
        while len(chunk) < rows:
            chunk.append({k: np.zeros_like(v) for k, v in chunk[0].items()})
        batches.append({k: np.stack([r[k] for r in chunk]) for k in BATCH_KEYS})
    return batches


def offline_batches(samples: list[dict], row_len: int, rows: int, slots: int) -> list[dict[str, np.ndarray]]:
    """An offline plan of the samples (binpack "best") built into rows as the "offline" pipeline
    does (concat_row + FinalizeRow), in a seeded shuffled row order, batched."""
    plan, _ = binpack.pack([len(s["tokens"]) for s in samples], [len(s["images"]) for s in samples],
                           row_len=row_len, max_images=slots)
    finalize = packing.FinalizeRow(max_images=slots, image_size=CONFIG.vision.image_size)
    row_list = []
    for r in np.random.default_rng(0).permutation(len(plan)):
        members = [samples[i] for i in plan[r]]
        row = finalize.map(offline.concat_row(members, row_len, sum(m["skipped"] for m in members)))
        row_list.append({k: row[k] for k in BATCH_KEYS})
    return _batched(row_list, rows)


def llava_length_grouped(samples: list[dict], batch_size: int, seed: int = 0) -> list[list[int]]:
    """LLaVA's ``get_modality_length_grouped_indices`` for one device: shuffle each modality,
    megabatches of ``batch_size`` sorted longest first, the two leftover megabatches merged into
    one extra batch, batches in random order."""
    rng = np.random.default_rng(seed)
    lengths = [len(s["tokens"]) for s in samples]
    mm = [i for i, s in enumerate(samples) if len(s["images"])]
    lang = [i for i, s in enumerate(samples) if not len(s["images"])]
    batches, leftovers = [], []
    for group in (mm, lang):
        idx = list(rng.permutation(group))
        megas = [sorted(idx[j : j + batch_size], key=lambda i: -lengths[i]) for j in range(0, len(idx), batch_size)]
        if megas and len(megas[-1]) < batch_size:
            leftovers += megas.pop()
        batches += megas
    if leftovers:
        batches.append(sorted(leftovers, key=lambda i: -lengths[i]))
    return [batches[i] for i in rng.permutation(len(batches))]


def padded_batch(samples: list[dict], idx: list[int]) -> dict[str, np.ndarray]:
    """Right-padded to the longest sample (our batch-contract keys + the images in order)."""
    chosen = [samples[i] for i in idx]
    n, length = len(chosen), max(len(s["tokens"]) for s in chosen)
    out = {
        "tokens": np.zeros((n, length), np.int32),
        "targets": np.zeros((n, length), np.int32),
        "loss_mask": np.zeros((n, length), bool),
        "segment_ids": np.zeros((n, length), np.int32),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (n, length)).copy(),
    }
    for r, s in enumerate(chosen):
        t = len(s["tokens"])
        out["tokens"][r, :t] = s["tokens"]
        out["targets"][r, :t] = s["targets"]
        out["loss_mask"][r, :t] = s["loss_mask"]
        out["segment_ids"][r, :t] = 1
    imgs = [im for s in chosen for im in s["images"]]
    out["pixels_nhwc"] = images_lib.normalize(np.stack(imgs)) if imgs else None
    out["has_image"] = np.array([len(s["images"]) > 0 for s in chosen])
    return out


def torch_inputs(b: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """HF inputs: labels at t+1 = tokens[t+1] where our loss_mask[t] (HF shifts inside the loss)."""
    ids = torch.from_numpy(b["tokens"].astype(np.int64))
    labels = torch.full_like(ids, -100)
    shifted = torch.from_numpy(b["loss_mask"][:, :-1])
    labels[:, 1:] = torch.where(shifted, ids[:, 1:], torch.tensor(-100))
    out = {"input_ids": ids, "attention_mask": torch.from_numpy(b["segment_ids"] > 0).long(), "labels": labels}
    if b["pixels_nhwc"] is not None:
        out["pixel_values"] = torch.from_numpy(np.ascontiguousarray(b["pixels_nhwc"].transpose(0, 3, 1, 2)))
    return out


def ours_padded(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same padded batch in our contract (one image slot per row; all rows have an image)."""
    assert b["has_image"].all(), "use a multimodal batch for (b)"
    out = {k: b[k] for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
    out["images"] = b["pixels_nhwc"][:, None]
    out["image_mask"] = np.ones((len(b["tokens"]), 1), bool)
    return out


# ---------------------------------------------------------------------------------------------
# the two train steps


def build_ours(total_steps: int):
    """The trainer's own wiring (``allava_jax.train.loop.setup_step``) on a 1-device mesh."""
    cfg = base_config()
    cfg.total_steps = total_steps
    cfg.param_rules = tuple(PARAM_RULES)
    cfg.optim.warmup_fraction = 0.0  # lr 2e-5 from step 0, like the torch side
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.devices()[:1])
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        setup = setup_step(cfg, CONFIG, mesh, DEFAULT_RULES)
        state = create_state(CONFIG, setup.optimizer, setup.param_rules, setup.shardings, setup.abstract, seed=0)
        step_fn = setup.jit(mesh)
    return mesh, state, step_fn


class Ours:
    def __init__(self, total_steps: int):
        self.mesh, self.state, self.step_fn = build_ours(total_steps)

    def step(self, host_batch: dict[str, np.ndarray]) -> dict:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(DEFAULT_RULES):
            self.state, metrics = self.step_fn(self.state, to_global_batch(host_batch, self.mesh))
            return jax.device_get(metrics)


class Torch:
    def __init__(self, params: dict):
        model = build_torch(CONFIG).train()
        state = {name: torch.from_numpy(np.array(t)) for name, t in hf.export_tensors(params, CONFIG, hf.HF_LLAVA)}
        model.load_state_dict(state, strict=True)
        model.model.vision_tower.requires_grad_(False)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        try:
            self.opt = torch.optim.AdamW(self.trainable, lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
            self.fused = True
        except (RuntimeError, TypeError):
            self.opt = torch.optim.AdamW(self.trainable, lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
            self.fused = False
        self.model = model

    def step(self, inputs: dict[str, torch.Tensor]) -> float:
        loss = self.model(**inputs, logits_to_keep=0).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


# ---------------------------------------------------------------------------------------------


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def real_tokens(samples: list[dict]) -> int:
    return sum(len(s["tokens"]) for s in samples)


def mfu(n_tokens: int, n_images: int, seq_len: int, seconds: float, peak: float, n_scored: int) -> float:
    flops = flops_lib.train_step_flops(CONFIG, n_tokens, n_images, seq_len, vision_trained=False, n_scored=n_scored)
    return flops / seconds / peak


def main() -> None:
    global MAX_IMAGES_PER_ROW
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=2, help="our packed rows per step")
    parser.add_argument("--torch-batch", type=int, default=4, help="torch samples per padded batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of (b)")
    parser.add_argument("--image-slots", type=int, default=MAX_IMAGES_PER_ROW, help="our image slots per packed row")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--offline-row-lens", default="1024,2048,4096", help="(a) on an offline plan at these row lengths")
    parser.add_argument("--offline-tokens", type=int, default=4096, help="token slots per step of the offline runs")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: a,b,offline,torch (torch: b and "
                        "torch's side of a)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    if "torch" in skip:
        skip.add("b")
    MAX_IMAGES_PER_ROW = args.image_slots

    peak = max(flops_lib.measure_matmul_flops(), flops_lib.measure_matmul_flops(n=2048))
    samples = make_samples(args.samples)
    n_img = sum(len(s["images"]) for s in samples)
    tok = real_tokens(samples)
    n_loss = sum(int(s["loss_mask"].sum()) for s in samples)

    ours = Ours(total_steps=10_000)
    params = jax.device_get(ours.state.params)
    tch = None if "torch" in skip else Torch(params)
    rows: list[tuple] = []

    # (b) identical padded batch: the first multimodal length-grouped batch.
    if "b" not in skip:
        groups = llava_length_grouped(samples, args.torch_batch)
        idx = next(g for g in groups if all(len(samples[i]["images"]) for i in g) and len(g) == args.torch_batch)
        pb = padded_batch(samples, idx)
        ob, ti = ours_padded(pb), torch_inputs(pb)
        b_tokens = int((pb["segment_ids"] > 0).sum())
        b_len = pb["tokens"].shape[1]
        loss_ours = float(ours.step(ob)["loss"])  # warm-up (compile); same weights on both sides
        loss_torch = tch.step(ti)
        t_ours = min(timed(lambda: ours.step(ob)) for _ in range(args.repeats))
        t_torch = min(timed(lambda: tch.step(ti)) for _ in range(args.repeats))
        for side, t in (("ours", t_ours), ("torch", t_torch)):
            rows.append(
                (f"(b) identical padded batch {len(idx)}x{b_len}", side, b_tokens, t,
                 b_tokens / t, mfu(b_tokens, len(idx), b_len, t, peak, int(pb["loss_mask"].sum())))
            )
        ratio_b = t_torch / t_ours
        b_check = f"step-1 loss on the identical batch: ours {loss_ours:.6f}, torch {loss_torch:.6f} (|diff| {abs(loss_ours - loss_torch):.2e})"

    # (a) end to end over all samples, each side its own way.
    if "a" not in skip:
        warm = packed_batches(samples[: args.rows * 2], args.seq_len, args.rows)[0]
        ours.step(warm)  # compile for the packed shape outside the timed region
        if tch is not None:
            tch.step(torch_inputs(padded_batch(samples, list(range(args.torch_batch)))))  # warm-up
        # Each side's batch building is timed with its steps. The sides run one after the other,
        # not interleaved: alternating steps slowed torch ~2x here (the two runtimes' worker threads
        # contend), which would flatter ours.
        start = time.perf_counter()
        batches = packed_batches(samples, args.seq_len, args.rows)
        for b in batches:
            ours.step(b)
        t_ours_a = time.perf_counter() - start
        n_rows = sum(int((b["segment_ids"].max(axis=1) > 0).sum()) for b in batches)
        slots = len(batches) * args.rows * args.seq_len
        rows.append(
            (f"(a) end to end, packed: {len(batches)} steps x {args.rows} rows x {args.seq_len} "
             f"({n_rows} real rows, {tok / slots:.0%} real, {MAX_IMAGES_PER_ROW} image slots/row)", "ours", tok, t_ours_a, tok / t_ours_a,
             mfu(tok, n_img, args.seq_len, t_ours_a, peak, n_loss))
        )
    if "a" not in skip and tch is not None:
        start = time.perf_counter()
        groups = llava_length_grouped(samples, args.torch_batch)
        torch_slots = 0
        for g in groups:
            pb = padded_batch(samples, g)
            tch.step(torch_inputs(pb))
            torch_slots += pb["tokens"].size
        t_torch_a = time.perf_counter() - start
        mean_len = int(np.mean([len(g) and max(len(samples[i]["tokens"]) for i in g) for g in groups]))
        rows.append(
            (f"(a) end to end, padded: {len(groups)} steps x <={args.torch_batch} samples "
             f"({tok / torch_slots:.0%} real)", "torch", tok, t_torch_a, tok / t_torch_a,
             mfu(tok, n_img, mean_len, t_torch_a, peak, n_loss))
        )
        ratio_a = t_torch_a / t_ours_a

    # (a) on offline plans: ours only, at several row lengths, the same samples.
    if "offline" not in skip:
        for row_len in [int(x) for x in args.offline_row_lens.split(",") if x]:
            n_rows, slots = max(1, args.offline_tokens // row_len), max(1, row_len // 512)
            ours.step(offline_batches(samples[:8], row_len, n_rows, slots)[0])  # compile outside the timing
            start = time.perf_counter()
            batches = offline_batches(samples, row_len, n_rows, slots)
            for b in batches:
                ours.step(b)
            t_off = time.perf_counter() - start
            real_rows = sum(int((b["segment_ids"].max(axis=1) > 0).sum()) for b in batches)
            slots_total = len(batches) * n_rows * row_len
            rows.append(
                (f"(a) end to end, offline plan: {len(batches)} steps x {n_rows} rows x {row_len} "
                 f"({real_rows} real rows filled {tok / (real_rows * row_len):.0%}, {tok / slots_total:.0%} real, "
                 f"{slots} image slots/row)", "ours", tok, t_off,
                 tok / t_off, mfu(tok, n_img, row_len, t_off, peak, n_loss))
            )

    torch_info = "not run" if tch is None else (
        f"(AdamW fused={tch.fused}, attn={tch.model.config.text_config._attn_implementation})")
    print(
        f"\njax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} {torch_info}, "
        f"transformers {transformers.__version__}, {args.threads} threads, fp32; "
        f"model 'mid' (benchmarks/forward.py), {args.samples} samples ({n_img} with an image, {tok:,} real tokens); "
        f"measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    print("| run | side | real tokens | seconds | real tokens/s | MFU |")
    print("|---|---|---|---|---|---|")
    for name, side, n, t, tps, m in rows:
        print(f"| {name} | {side} | {n:,} | {t:.2f} | {tps:,.0f} | {m:.1%} |")
    if "a" not in skip and tch is not None:
        print(f"\n(a) ours / torch end to end: {ratio_a:.2f}x (target >= 1.5x)")
    if "b" not in skip:
        print(f"(b) ours / torch same padded batch: {ratio_b:.2f}x (target >= 1.0x)")
        print(b_check)


if __name__ == "__main__":
    main()
