"""Peak memory and time of `convert import` and `convert export` on a full-size checkpoint.

    python benchmarks/convert.py [--workdir /tmp/allava_convert_bench] [--preset phi2_clip336] [--keep]

Writes a random bf16 `phi2_clip336` HF Llava directory locally (~6.2 GB, legacy names as
transformers 5 `save_pretrained` writes them, 5 GB shards), then runs, each in a fresh process,
`python -m allava_jax.convert import` (-> our fp32 orbax checkpoint) and `export` (-> HF, bf16
because the import recorded bf16). Peak RSS is the child's `ru_maxrss` (`os.wait4`). Spot-checks
that exported tensors equal the input bit for bit, prints one table, deletes the workdir.
Target (issue 3): peak RSS <= 1.5x the larger of the input and output checkpoints on disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flax.linen as nn  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from allava_jax.convert import hf  # noqa: E402
from allava_jax.convert.exporter import hf_config  # noqa: E402
from allava_jax.convert.sources import TensorSource, dir_size  # noqa: E402
from allava_jax.convert.writer import write_safetensors  # noqa: E402
from allava_jax.models import abstract_params, get_preset  # noqa: E402

GB = 1e9


def tokenizer(directory: Path) -> None:
    """A small local byte-level BPE (Phi-2's real one is not downloaded)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["[INST] What is in the image? [/INST] A cat."], trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(directory))


def write_random_llava(directory: Path, preset: str) -> int:
    """A random bf16 HF Llava directory of ``preset``; returns the number of parameters."""
    config = get_preset(preset).replace(text={"lm_head_bias": False})
    shapes = nn.unbox(abstract_params(config))
    zero = lambda s: np.broadcast_to(np.zeros((), np.float32), s.shape)  # noqa: E731
    layout = hf.HF_LLAVA_SAVED_V5
    planned = [(n, tuple(t.shape)) for n, t in hf.export_tensors(_tree_map(shapes, zero), config, layout)]
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 24, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    def tensors():
        for name, shape in planned:
            n = int(np.prod(shape))
            start = int(rng.integers(0, pool.size))
            yield name, np.resize(np.roll(pool, -start), n).reshape(shape)

    directory.mkdir(parents=True)
    hf_config(config, None, "bfloat16").save_pretrained(str(directory))
    write_safetensors(directory, planned, tensors(), dtype="bfloat16", max_shard_bytes=5 * 10**9)
    tokenizer(directory)
    return sum(int(np.prod(s)) for _, s in planned)


def _tree_map(tree, fn):
    return {k: _tree_map(v, fn) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def run(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of one ``python -m allava_jax.convert`` child."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "allava_jax.convert", *args], cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"convert {args[0]} failed ({status})")
    return seconds, usage.ru_maxrss * 1024 / GB


def spot_check(src: Path, out: Path, names: list[str]) -> None:
    a, b = TensorSource(src), TensorSource(out)
    for name in names:
        hub = name.replace("vision_tower.", "vision_tower.vision_model.", 1) if name.startswith("vision_tower.") else name
        x, y = a.read(name), b.read(hub)
        if x.dtype != y.dtype or not np.array_equal(x.view(np.uint16), y.view(np.uint16)):
            raise SystemExit(f"round trip changed {name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/allava_convert_bench")
    p.add_argument("--preset", default="phi2_clip336")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    args = p.parse_args()
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    free = shutil.disk_usage(work).free / GB
    print(f"free disk at {work}: {free:.0f} GB", flush=True)
    if args.preset == "phi2_clip336" and free < 30:
        raise SystemExit("need ~25 GB free (6 GB input, 12 GB fp32 checkpoint, 6 GB output)")
    src, ckpt, out = work / "hf_in", work / "ckpt", work / "hf_out"
    try:
        t0 = time.perf_counter()
        n_params = write_random_llava(src, args.preset)
        print(f"wrote {n_params / 1e9:.2f} B random bf16 params in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = []
        t, rss = run(["import", "--src", str(src), "--out", str(ckpt)])
        rows.append(("import (HF bf16 -> orbax fp32)", t, rss, dir_size(src), dir_size(ckpt)))
        t, rss = run(["export", "--checkpoint", str(ckpt), "--out", str(out)])
        rows.append(("export (orbax fp32 -> HF bf16)", t, rss, dir_size(ckpt), dir_size(out)))
        spot_check(src, out, ["language_model.model.layers.31.mlp.fc1.weight", "vision_tower.encoder.layers.23.self_attn.q_proj.weight",
                              "multi_modal_projector.linear_2.weight", "language_model.lm_head.weight"]
                   if args.preset == "phi2_clip336" else ["multi_modal_projector.linear_2.weight"])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.preset}: {n_params / 1e9:.2f} B params, {os.cpu_count()} CPU cores; round trip spot-checked bit-identical\n")
    print("| step | time (s) | peak RSS (GB) | input on disk (GB) | output on disk (GB) | peak RSS / larger checkpoint |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, t, rss, a, b in rows:
        print(f"| {name} | {t:.0f} | {rss:.2f} | {a / GB:.2f} | {b / GB:.2f} | {rss * GB / max(a, b):.2f}x |")


if __name__ == "__main__":
    main()
