"""The TPU and GPU tables: the paper's two stages AOT-compiled for TPU slices (libtpu, no TPU) or
NVIDIA GPU nodes (the jax CUDA plugin's compiler, no GPU).

    python benchmarks/tpu_compile.py [--jobs 2] [--rows-per-chip 2] [--topologies v5e-8,v5e-256,...]
                                     [--attention xla,splash] [--stages 1,2] [--reports FILE]
    python benchmarks/tpu_compile.py --gpu [--topologies a100-8,h100-8,h200-8,2xh100-8] [--attention xla,flash]
                                     [--models phi2_clip336,stablelm2_clip336] [--stages 1,2] [--jobs 1]

Each case is one ``python -m allava_jax.train.compile`` process (configs/allava_stage{1,2}.py,
phi2_clip336, the paper's global batch, seq 2048, bf16, remat full, vision frozen) at a
micro-batch of ``--rows-per-chip`` rows per batch shard (the whole batch when that is more), the
batch over data x fsdp, and tensor parallelism only where the batch has fewer rows than the slice
has chips. Figures are per chip, from libtpu's ``memory_analysis()``; "fits" is against the chip's
HBM. ``--smallest`` instead runs the compile command's own search for the smallest v5e slice of
each stage (``--topology v5e --smallest --fit_micro_batch``). Needs ``pip install libtpu==0.0.42.1``.

``--gpu`` compiles for GPU nodes (``pip install -r requirements-gpu.txt``), each case at its largest
micro-batch that fits: the whole global batch first, and when that does not fit the compile
command's ``--fit_micro_batch`` search (its halvings down to one row per GPU, by compiling); "fits"
is against JAX's share of each GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75).
``--models`` swaps the backbone preset.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from allava_jax.train.compile import GIB, TOPOLOGIES, device_count  # noqa: E402

DEFAULT_TOPOLOGIES = "v5e-8,v5e-16,v5e-64,v5e-256,v4-8,v4-32,v5p-8,v6e-8"
GPU_TOPOLOGIES = "a100-8,h100-8"
BATCH = {1: 256, 2: 128}


def case_flags(stage: int, topology: str, attention: str, rows_per_chip: int, model: str = "",
               fit: bool = False) -> list[str]:
    """One compile's flags: ``rows_per_chip`` rows per batch shard per micro-batch, or (``fit``) the
    whole batch in one micro-batch (the first try of ``--gpu``)."""
    n, batch = device_count(topology), BATCH[stage]
    tensor = max(1, n // batch)
    shards = n // tensor
    micro = batch if fit else min(batch, shards * rows_per_chip)
    return [f"--config={ROOT}/configs/allava_stage{stage}.py", f"--topology={topology}",
            f"--config.model_overrides.attention={attention}", f"--config.mesh.tensor={tensor}",
            f"--config.micro_batch_size={micro}", *([f"--config.model={model}"] if model else [])]


def run(flags: list[str], reports: str, log: Path) -> int:
    cmd = [sys.executable, "-m", "allava_jax.train.compile", *flags, f"--reports={reports}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode


def table(rows: list[dict]) -> str:
    out = ["| model | stage | slice | chips (mesh) | attention | micro-batch x accum | args GiB | temps GiB | peak GiB "
           "| limit GiB | fits | compile s |", "|---|---|---|---|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1)
        gemms = " (cuBLAS GEMMs)" if r.get("note") else ""  # the compiler's Triton GEMM tiling failed
        out.append(f"| {r['model']} | {r['stage']} | {r['target']} | {r['chips']} ({mesh}) | {r['attention']}{gemms} | "
                   f"{r['micro_batch']} x {r['accum']} | {r['argument'] / GIB:.2f} | {r['temp'] / GIB:.2f} | "
                   f"{r['total'] / GIB:.2f} | {r['hbm'] / GIB:.{1 if r.get('device_memory') else 0}f} | "
                   f"{'yes' if r['fits'] else 'no (compiler: out of HBM)' if r.get('oom') else 'no'} | "
                   f"{r['compile_s']:.0f} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2, help="compiles at once (each takes about 1.3 cores)")
    p.add_argument("--gpu", action="store_true", help="GPU nodes, each case at its largest micro-batch that fits")
    p.add_argument("--topologies", default="")
    p.add_argument("--attention", default="")
    p.add_argument("--models", default="phi2_clip336", help="backbone presets (--config.model)")
    p.add_argument("--stages", default="1,2")
    p.add_argument("--rows-per-chip", type=int, default=2)
    p.add_argument("--smallest", action="store_true", help="search the smallest v5e slice per stage instead")
    p.add_argument("--reports", default="", help="JSONL of every compile (default: a temporary file)")
    args = p.parse_args()
    args.topologies = args.topologies or (GPU_TOPOLOGIES if args.gpu else DEFAULT_TOPOLOGIES)
    args.attention = args.attention or ("xla,flash" if args.gpu else "xla,splash")
    reports = args.reports or tempfile.mkstemp(suffix=".jsonl")[1]
    logs = Path(tempfile.mkdtemp(prefix="tpu_compile_"))
    stages = [int(s) for s in args.stages.split(",")]
    cases = []
    for stage in stages:
        if args.smallest:
            cases.append((stage, [f"--config={ROOT}/configs/allava_stage{stage}.py", "--topology=v5e", "--smallest",
                                  "--fit_micro_batch", "--config.model_overrides.attention=xla"]))
            continue
        for model in args.models.split(","):
            for topology in args.topologies.split(","):
                if topology not in TOPOLOGIES:
                    sys.exit(f"unknown slice {topology}")
                for attention in args.attention.split(","):
                    cases.append((stage, case_flags(stage, topology, attention, args.rows_per_chip, model, args.gpu)))

    def one(i_case: tuple[int, tuple[int, list[str]]]) -> tuple[int, int]:
        i, (stage, flags) = i_case
        rc = run(flags, f"{reports}.case{i:02d}", logs / f"{i:02d}.log")
        if args.gpu and rc == 1:  # the whole batch does not fit: the largest micro-batch that does
            rc = run([*flags, "--fit_micro_batch"], f"{reports}.case{i:02d}", logs / f"{i:02d}.fit.log")
        print(f"case {i}: stage {stage} {' '.join(flags[1:])}: rc {rc}, log {logs / f'{i:02d}.log'}", flush=True)
        return i, rc

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, enumerate(cases)))
    rows = []
    for i, (stage, flags) in enumerate(cases):
        path = Path(f"{reports}.case{i:02d}")
        if not path.exists():
            continue
        model = next((f.split("=")[1] for f in flags if f.startswith("--config.model=")), "phi2_clip336")
        case = [{"stage": stage, "model": model, **json.loads(line)} for line in path.read_text().splitlines()]
        if args.gpu:  # the search's verdict: the largest micro-batch that fits, else the smallest tried
            fitting = [r for r in case if r["fits"]]
            case = [max(fitting, key=lambda r: r["micro_batch"]) if fitting else min(case, key=lambda r: r["micro_batch"])]
        rows += case
    compiler = "the jax CUDA plugin 0.10.2 (XLA's GPU compiler, deviceless)" if args.gpu else "libtpu 0.0.42.1"
    limit = "JAX's share of each GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION)" if args.gpu else "the chip's HBM"
    print(f"\nseq 2048, bf16, remat full, vision frozen; global batch 256 (stage 1) / 128 (stage 2); "
          f"per device, {compiler} AOT; limit: {limit} (reports: {reports}.case*)")
    print(table(rows))


if __name__ == "__main__":
    main()
