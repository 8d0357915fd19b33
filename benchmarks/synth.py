"""Synthesis throughput vs concurrency against the local fake server with 1 s simulated latency.

    python benchmarks/synth.py [--latency 1.0] [--seconds 8] [--concurrency 1 8 32 128]

Starts ``allava_jax.synth.fake_server`` in its own process (so server work does not share our
GIL), then runs the real LAION pipeline (image downscale + JPEG data URL, SDK request, parse,
journal, export) at each concurrency on enough items for about ``--seconds`` of ideal run time,
and prints items/s against the ideal (concurrency / latency).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allava_jax.synth.config import SynthConfig  # noqa: E402
from allava_jax.synth.items import laion_from_folder  # noqa: E402
from allava_jax.synth.pipeline import run  # noqa: E402


def make_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, size=(384, 512, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i:05d}.jpg", quality=85)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latency", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=8.0, help="ideal run time per point")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    root = Path(__file__).resolve().parents[1]
    server = subprocess.Popen([sys.executable, "-m", "allava_jax.synth.fake_server", "--latency", str(args.latency)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    try:
        url = server.stdout.readline().split()[1]
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            n_max = max(int(c * args.seconds / args.latency) for c in args.concurrency)
            make_images(Path(tmp) / "imgs", n_max)
            all_items = laion_from_folder(Path(tmp) / "imgs")
            for c in args.concurrency:
                n = max(c, int(c * args.seconds / args.latency))
                cfg = SynthConfig(mode="laion", out=Path(tmp) / f"out{c}", model="gpt-4o", base_url=url,
                                  concurrency=c, progress=False, timeout=30)
                t0 = time.perf_counter()
                summary = run(cfg, all_items[:n])
                dt = time.perf_counter() - t0
                assert summary["done"] == n, summary
                ideal = c / args.latency
                rows.append((c, n, dt, n / dt, ideal))
        print(f"\nsynthesis throughput, fake server latency {args.latency:g} s, LAION mode, 512x384 images")
        print("| concurrency | items | seconds | items/s | ideal items/s | efficiency |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for c, n, dt, ips, ideal in rows:
            print(f"| {c} | {n} | {dt:.1f} | {ips:.2f} | {ideal:.0f} | {100 * ips / ideal:.0f} % |")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
