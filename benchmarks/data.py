"""Data pipeline benchmark: packing utilisation and per-core preprocessing throughput.

    python benchmarks/data.py [--samples 20000] [--throughput-samples 160] [--plan-samples 1000000]
        [--length-samples 2000] [--skip throughput,plan_time]

1. Packing utilisation (real tokens / token slots) at L = 2048 for an ALLaVA-like length mix
   (75 % image samples: 576 image tokens + 50-1500 text tokens; 25 % text-only: 100-2000 tokens):
   LLaVA's unpacked training (length-grouped batches padded to the longest; 16 per device x 8),
   grain first-fit and best-fit packing, and offline plans (allava_jax.data.binpack, what
   `python -m allava_jax.data plan` writes) in rows of 2048 and of 4096 (samples still <= 2048).
   Offline planning time: the packing step on --plan-samples synthetic lengths, and the lengths
   pass (`plan.measure`: read + template + tokenize, images not opened) on --length-samples
   ALLaVA-like records, one core, extrapolated to --plan-samples.
2. Samples/s on one core for decode + preprocess + tokenize (+ pack) of 891x770 JPEGs (the paper's
   mean image size) through our grain pipeline (worker_count=0, no read threads), against the same
   work done the way LLaVA's PyTorch `LazySupervisedDataset` + collator does it (PIL open,
   expand2square, `CLIPImageProcessor` (the PIL implementation), `tokenizer_image_token` per round).
   A last row times only PIL's decode + pad + bicubic resize, which exact preprocessing cannot
   skip: its rate bounds what any exact pipeline can reach.

3. Native resolution (LLaVA-OneVision-1.5), ``--native-samples``: an LLaVA-OV-like mix (80 %
   image samples, 1-4 images each of widely varying size and aspect, each costing its own
   grid_h * grid_w / 4 tokens under the 4B release's smart_resize; 20 % text-only) packed into
   8192-token rows under two budgets, LLM tokens and vision patches per row: one sample per row,
   grain best-fit online, and offline plans (bfd) at several patch budgets; both budgets'
   utilisation.

Everything is synthetic and local (a byte-level BPE trained here); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from allava_jax.data import binpack, native, packing, pipeline  # noqa: E402

SEQ_LEN = 2048
NUM_IMAGE_TOKENS = 576
WORDS = ("the a image shows man woman dog cat red blue green large small on in with of and is are "
         "there this that which street table sky tree building car people standing sitting near "
         "background foreground colour light dark wooden metal picture detailed scene").split()


# ---------------------------------------------------------------------------------------------
# 1. packing utilisation


def length_mix(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    is_image = rng.random(n) < 0.75
    text = np.where(is_image, rng.integers(50, 1501, n), rng.integers(100, 2001, n))
    lengths = np.minimum(np.where(is_image, NUM_IMAGE_TOKENS + text, text), SEQ_LEN)  # truncated
    return lengths.tolist(), is_image.astype(int).tolist()


def bench_packing(n: int) -> list[tuple[str, float]]:
    lengths, n_img = length_mix(n)
    padded = packing.padded_utilisation(lengths, batch_size=16, world_size=8, is_multimodal=[k > 0 for k in n_img])
    rows = [("padding, LLaVA length-grouped (16/device x 8)", padded)]
    for bins in (16, 128, 1024):
        for method in ("first_fit", "best_fit"):
            rows.append((f"grain {method}, {bins} bins", packing.simulate_utilisation(
                lengths, seq_len=SEQ_LEN, method=method, num_bins=bins, num_images=n_img,
                max_images=4)))
    bound = bfd_utilisation(lengths, SEQ_LEN)
    rows.append(("offline best-fit-decreasing over all samples, no image limit (upper bound)", bound))
    for row_len, slots in ((SEQ_LEN, 4), (2 * SEQ_LEN, 4), (2 * SEQ_LEN, 8)):
        for method in ("bfd", "bucket"):
            plan = binpack.METHODS[method](lengths, n_img, row_len=row_len, max_images=slots)
            u = binpack.utilisation(plan, lengths, row_len)
            rows.append((f"offline plan ({method}), rows of {row_len}, {slots} image slots "
                         f"({(1 - padded) / (1 - u):.1f}x less padding than LLaVA)", u))
    rows.append((f"grain best_fit, 128 bins, rows of {2 * SEQ_LEN}", packing.simulate_utilisation(
        lengths, seq_len=2 * SEQ_LEN, method="best_fit", num_bins=128, num_images=n_img, max_images=8)))
    return rows


def bfd_utilisation(lengths: list[int], row_len: int) -> float:
    """Offline best-fit decreasing with no image limit: what any packer could reach without
    splitting samples."""
    rows = binpack.best_fit_decreasing(lengths, [0] * len(lengths), row_len=row_len, max_images=0)
    return binpack.utilisation(rows, lengths, row_len)


def bench_plan_time(n: int) -> list[tuple[str, float, int, float]]:
    """(method, CPU seconds, rows, utilisation) of packing n synthetic lengths into 2048 / 4096 rows."""
    lengths, n_img = length_mix(n, seed=1)
    out = []
    for row_len, slots in ((SEQ_LEN, 4), (2 * SEQ_LEN, 8)):
        for method in ("bfd", "bucket"):
            start = time.process_time()
            plan = binpack.METHODS[method](lengths, n_img, row_len=row_len, max_images=slots)
            out.append((f"{method}, rows of {row_len}", time.process_time() - start, len(plan),
                        binpack.utilisation(plan, lengths, row_len)))
    return out


def bench_lengths_pass(n: int) -> tuple[float, float]:
    """(samples per CPU-second, mean tokens) of `plan.measure` on n ALLaVA-like records, one core."""
    from allava_jax.data import plan

    tok = make_tokenizer()
    with tempfile.TemporaryDirectory() as root:
        path = write_corpus(root, n, with_images=False)
        cache = os.path.join(root, "cache")
        kw = dict(seq_len=SEQ_LEN, num_image_tokens=NUM_IMAGE_TOKENS, max_images=4, cache_dir=cache)
        plan.measure([{"path": path}], tok, **kw)  # warm-up: the JSON index, imports
        start = time.process_time()
        measured = plan.measure([{"path": path}], tok, **kw)
        cpu = time.process_time() - start
    assert measured.report.usable == n
    return n / cpu, float(measured.lengths.mean())


# ---------------------------------------------------------------------------------------------
# 2. throughput


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(50)) for _ in range(2000)]
    corpus += ["[INST] describe the image [/INST] The image shows"] * 50
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


def photo_like_jpeg(seed: int, w: int = 891, h: int = 770) -> bytes:
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.asarray(base).astype(np.int16) + rng.integers(-25, 25, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_corpus(root: str, n: int, with_images: bool = True) -> str:
    """ALLaVA-like records (one image each, 10-40 question and 60-400 answer words) and their
    JPEGs (`with_images=False`: the records only, for the lengths pass, which never opens images)."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = random.Random(1)
    records = []
    for i in range(n):
        name = f"images/{i}.jpg"
        if with_images:
            with open(os.path.join(root, name), "wb") as f:
                f.write(photo_like_jpeg(i))
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40)))
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 400)))
        records.append({"id": str(i), "image": name, "conversations": [
            {"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]})
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def _timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def ours(path: str, root: str, tok, n: int, jpeg_draft: bool, normalize: bool = True) -> None:
    it = pipeline.make_pipeline(
        [{"path": path, "image_root": root}], tok, seq_len=SEQ_LEN, batch_size=8,
        image_token_id=tok.convert_tokens_to_ids("<image>"), image_size=336,
        num_image_tokens=NUM_IMAGE_TOKENS, max_images_per_row=4, num_epochs=1,
        read_threads=0, drop_remainder=False, jpeg_draft=jpeg_draft, shard_index=0, shard_count=1,
        normalize_images=normalize,
    )
    got = sum(int(b["segment_ids"].max(axis=1).sum()) for b in it)
    assert got == n, (got, n)


def llava_way(path: str, root: str, tok, n: int) -> None:
    """LLaVA's LazySupervisedDataset.__getitem__ (image + v1-style preprocess) + collator."""
    import torch
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    records = json.load(open(path))
    image_id = -200  # LLaVA's IMAGE_TOKEN_INDEX

    def expand2square(img, bg):
        w, h = img.size
        if w == h:
            return img
        s = max(w, h)
        out = Image.new(img.mode, (s, s), bg)
        out.paste(img, ((s - w) // 2, (s - h) // 2))
        return out

    def tokenizer_image_token(prompt):
        chunks = [tok(c).input_ids for c in prompt.split("<image>")]
        ids = []
        for i, c in enumerate(chunks):
            if i:
                ids.append(image_id)
            ids += c
        return ids

    def getitem(r):
        image = Image.open(os.path.join(root, r["image"])).convert("RGB")
        image = expand2square(image, tuple(int(x * 255) for x in processor.image_mean))
        pixels = processor.preprocess(image, return_tensors="pt")["pixel_values"][0]
        conv = r["conversations"]
        rounds = [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv), 2)]
        prompt = "".join(f"[INST] {q} [/INST] {a}<|endoftext|>" for q, a in rounds)
        input_ids = torch.tensor(tokenizer_image_token(prompt), dtype=torch.long)
        targets = input_ids.clone()
        cur = 0
        for q, a in rounds:  # mask instructions, as LLaVA's preprocess_v1 does per round
            rou = f"[INST] {q} [/INST] {a}<|endoftext|>"
            inst = f"[INST] {q} [/INST] "
            rl, il = len(tokenizer_image_token(rou)), len(tokenizer_image_token(inst))
            targets[cur:cur + il] = -100
            cur += rl
        return {"input_ids": input_ids[:SEQ_LEN], "labels": targets[:SEQ_LEN], "image": pixels}

    done = 0
    for start in range(0, n, 8):
        batch = [getitem(r) for r in records[start:start + 8]]
        torch.nn.utils.rnn.pad_sequence([b["input_ids"] for b in batch], batch_first=True)
        torch.nn.utils.rnn.pad_sequence([b["labels"] for b in batch], batch_first=True, padding_value=-100)
        torch.stack([b["image"] for b in batch])
        done += len(batch)
    assert done == n


def exact_floor(path: str, root: str, n: int) -> None:
    """Only what any exact pipeline must do per sample: PIL decode, pad to square, bicubic resize
    (CLIPImageProcessor's own resize). Its rate bounds every exact pipeline's."""
    mean = (122, 116, 104)
    for r in json.load(open(path))[:n]:
        image = Image.open(os.path.join(root, r["image"])).convert("RGB")
        w, h = image.size
        side = max(w, h)
        square = Image.new("RGB", (side, side), mean)
        square.paste(image, ((side - w) // 2, (side - h) // 2))
        square.resize((336, 336), Image.BICUBIC)


def bench_throughput(n: int) -> list[tuple[str, float, float]]:
    import torch

    torch.set_num_threads(1)
    tok = make_tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        path = write_corpus(root, n)
        os.environ["ALLAVA_JAX_CACHE"] = os.path.join(root, "cache")
        ours(path, root, tok, n, False)  # warm up (JSON index, imports, page cache)
        llava_way(path, root, tok, 8)
        for name, fn in [
            ("LLaVA PyTorch dataset (CLIPImageProcessor, PIL)", lambda: llava_way(path, root, tok, n)),
            ("ours: grain pipeline, packed (exact preprocessing)", lambda: ours(path, root, tok, n, False)),
            ("ours + jpeg_draft (reduced-scale JPEG decode)", lambda: ours(path, root, tok, n, True)),
            ("ours, exact, uint8 images (normalise on device)", lambda: ours(path, root, tok, n, False, False)),
            ("ours + jpeg_draft, uint8 images", lambda: ours(path, root, tok, n, True, False)),
            ("floor of any exact pipeline: PIL decode + pad + bicubic resize only", lambda: exact_floor(path, root, n)),
        ]:
            wall, cpu = _timed(fn)
            rows.append((name, n / wall, n / cpu))
    return rows


def draft_deviation(n: int = 16) -> tuple[float, float]:
    """Mean / max |exact - jpeg_draft| in uint8 levels after preprocessing to 336 px."""
    from allava_jax.data import images

    diffs = [np.abs(images.load_image(b, 336).astype(int) - images.load_image(b, 336, jpeg_draft=True))
             for b in (photo_like_jpeg(i) for i in range(n))]
    return float(np.mean([d.mean() for d in diffs])), float(max(d.max() for d in diffs))


# ---------------------------------------------------------------------------------------------
# 3. native resolution: two budgets

NATIVE_ROW = 8192


def native_mix(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(LLM tokens, images, patches) per sample of an LLaVA-OV-like mix: image sides log-normal
    around 700 px (28 px .. 4000 px), aspect log-uniform in [1/4, 4], 1-4 images per image sample
    (85 % one); text U[30, 1500] tokens (text-only samples U[100, 3000]). Samples over the row
    length are dropped (a packed sample never exceeds its row)."""
    rng = np.random.default_rng(seed)
    spec = native.NativeSpec()
    lengths, images, patches = [], [], []
    for _ in range(n):
        if rng.random() < 0.2:
            lengths.append(int(rng.integers(100, 3001)))
            images.append(0)
            patches.append(0)
            continue
        k = 1 if rng.random() < 0.85 else int(rng.integers(2, 5))
        tokens = int(rng.integers(30, 1501))
        p = 0
        for _ in range(k):
            side = float(np.clip(rng.lognormal(np.log(700), 0.6), 28, 4000))
            aspect = float(np.exp(rng.uniform(np.log(0.25), np.log(4.0))))
            gh, gw = spec.grid(max(14, int(side * aspect**0.5)), max(14, int(side / aspect**0.5)))
            p += gh * gw
            tokens += gh * gw // 4 + 2  # + <|vision_start|>, <|vision_end|>
        if tokens <= NATIVE_ROW:
            lengths.append(tokens)
            images.append(k)
            patches.append(p)
    return np.asarray(lengths), np.asarray(images), np.asarray(patches)


def bench_native(n: int) -> list[tuple[str, float, float]]:
    """(method, LLM-token utilisation, patch utilisation) in 8192-token rows."""
    lengths, n_img, n_patch = native_mix(n)
    out = []
    for max_patches in (4 * NATIVE_ROW, 2 * NATIVE_ROW, 3 * NATIVE_ROW // 2):
        keep = n_patch <= max_patches  # a sample over the budget is a counted skip (too_many_patches)
        lens, imgs, pats = lengths[keep], n_img[keep], n_patch[keep]
        tag = f"{max_patches} patches/row ({(~keep).sum()} samples over it skipped)"
        if max_patches == 4 * NATIVE_ROW:
            out.append((f"one sample per row, {tag}", lens.mean() / NATIVE_ROW, pats.mean() / max_patches))
        u = packing.simulate_utilisation(lens.tolist(), seq_len=NATIVE_ROW, method="best_fit", num_bins=128,
                                         num_images=imgs.tolist(), max_images=16, num_patches=pats.tolist(),
                                         max_patches=max_patches)
        rows = lens.sum() / (u * NATIVE_ROW)
        out.append((f"grain best_fit online, 128 bins, {tag}", u, pats.sum() / (rows * max_patches)))
        plan, _ = binpack.pack(lens, imgs, row_len=NATIVE_ROW, max_images=16, patches=pats, max_patches=max_patches)
        assert all(pats[r].sum() <= max_patches and lens[r].sum() <= NATIVE_ROW for r in plan)
        out.append((f"offline plan (bfd), {tag}", binpack.utilisation(plan, lens, NATIVE_ROW),
                    pats.sum() / (len(plan) * max_patches)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--throughput-samples", type=int, default=160)
    ap.add_argument("--plan-samples", type=int, default=1_000_000)
    ap.add_argument("--length-samples", type=int, default=2000)
    ap.add_argument("--native-samples", type=int, default=20000)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: packing,plan_time,throughput,native")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    from allava_jax.train.flops import measure_matmul_flops

    print(f"measured fp32 matmul peak: {measure_matmul_flops(2048) / 1e9:.0f} GFLOP/s (n=2048)\n")

    if "packing" not in skip:
        print(f"## Packing utilisation, L={SEQ_LEN}, {args.samples} samples "
              "(75% image: 576 + U[50,1500] tokens; 25% text: U[100,2000])\n")
        print("| method | utilisation |\n| --- | --- |")
        for name, u in bench_packing(args.samples):
            print(f"| {name} | {u:.1%} |")

    if "plan_time" not in skip:
        print(f"\n## Offline planning time, one core: packing {args.plan_samples:,} synthetic lengths\n")
        print("| packer | CPU seconds | rows | utilisation |\n| --- | --- | --- | --- |")
        for name, cpu, n_rows, u in bench_plan_time(args.plan_samples):
            print(f"| {name} | {cpu:.1f} | {n_rows:,} | {u:.1%} |")
        rate, mean_len = bench_lengths_pass(args.length_samples)
        print(f"\nlengths pass (read + template + tokenize, images not opened): {rate:,.0f} samples per "
              f"CPU-second on {args.length_samples} records of {mean_len:.0f} tokens; {args.plan_samples:,} "
              f"samples: ~{args.plan_samples / rate / 60:.1f} CPU-minutes (extrapolated; `plan --workers N` "
              "splits it over N processes)")

    if "throughput" not in skip:
        print(f"\n## Throughput, one core, {args.throughput_samples} samples of 891x770 JPEG -> 336 px, "
              f"L={SEQ_LEN}\n")
        rows = bench_throughput(args.throughput_samples)
        base = rows[0][2]
        print("| pipeline | samples/s (wall) | samples per CPU-second | vs LLaVA (CPU) |\n| --- | --- | --- | --- |")
        for name, wall, cpu in rows:
            print(f"| {name} | {wall:.1f} | {cpu:.1f} | {cpu / base:.2f}x |")
        mean, worst = draft_deviation()
        print(f"\njpeg_draft pixels vs exact: mean |diff| {mean:.2f}, max {worst:.0f} uint8 levels")


    if "native" not in skip:
        print(f"\n## Native resolution (LLaVA-OneVision-1.5): {args.native_samples} samples of an LLaVA-OV-like "
              f"mix, rows of {NATIVE_ROW} tokens, up to 16 images\n")
        print("| method | LLM-token utilisation | patch utilisation |\n| --- | --- | --- |")
        for name, u, pu in bench_native(args.native_samples):
            print(f"| {name} | {u:.1%} | {pu:.1%} |")


if __name__ == "__main__":
    main()
