"""The README's TPU table: the paper's two stages AOT-compiled for TPU slices (libtpu, no TPU).

    python benchmarks/tpu_compile.py [--jobs 2] [--rows-per-chip 2] [--topologies v5e-8,v5e-256,...]
                                     [--attention xla,splash] [--stages 1,2] [--reports FILE]

Each case is one ``python -m allava_jax.train.compile`` process (configs/allava_stage{1,2}.py,
phi2_clip336, the paper's global batch, seq 2048, bf16, remat full, vision frozen) at a
micro-batch of ``--rows-per-chip`` rows per batch shard (the whole batch when that is more), the
batch over data x fsdp, and tensor parallelism only where the batch has fewer rows than the slice
has chips. Figures are per chip, from libtpu's ``memory_analysis()``; "fits" is against the chip's
HBM. ``--smallest`` instead runs the compile command's own search for the smallest v5e slice of
each stage (``--topology v5e --smallest --fit_micro_batch``). Needs ``pip install libtpu==0.0.42.1``.
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

from allava_jax.train.compile import GIB, TOPOLOGIES  # noqa: E402

DEFAULT_TOPOLOGIES = "v5e-8,v5e-16,v5e-64,v5e-256,v4-8,v4-32,v5p-8,v6e-8"
BATCH = {1: 256, 2: 128}


def chips(topology: str) -> int:
    """Devices of a named slice (v4 and v5p names count two TensorCores per chip)."""
    n = int(topology.split("-")[1])
    return n // 2 if topology.split("-")[0] in ("v4", "v5p") else n


def case_flags(stage: int, topology: str, attention: str, rows_per_chip: int) -> list[str]:
    n, batch = chips(topology), BATCH[stage]
    tensor = max(1, n // batch)
    shards = n // tensor
    micro = min(batch, shards * rows_per_chip)
    return [f"--config={ROOT}/configs/allava_stage{stage}.py", f"--topology={topology}",
            f"--config.model_overrides.attention={attention}", f"--config.mesh.tensor={tensor}",
            f"--config.micro_batch_size={micro}"]


def run(flags: list[str], reports: str, log: Path) -> int:
    cmd = [sys.executable, "-m", "allava_jax.train.compile", *flags, f"--reports={reports}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode


def table(rows: list[dict]) -> str:
    out = ["| stage | slice | chips (mesh) | attention | micro-batch x accum | args GiB | temps GiB | peak GiB "
           "| HBM GiB | fits | compile s |", "|---|---|---|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1)
        out.append(f"| {r['stage']} | {r['target']} | {r['chips']} ({mesh}) | {r['attention']} | "
                   f"{r['micro_batch']} x {r['accum']} | {r['argument'] / GIB:.2f} | {r['temp'] / GIB:.2f} | "
                   f"{r['total'] / GIB:.2f} | {r['hbm'] / GIB:.0f} | "
                   f"{'yes' if r['fits'] else 'no (compiler: out of HBM)' if r.get('oom') else 'no'} | "
                   f"{r['compile_s']:.0f} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2, help="compiles at once (each takes about 1.3 cores)")
    p.add_argument("--topologies", default=DEFAULT_TOPOLOGIES)
    p.add_argument("--attention", default="xla,splash")
    p.add_argument("--stages", default="1,2")
    p.add_argument("--rows-per-chip", type=int, default=2)
    p.add_argument("--smallest", action="store_true", help="search the smallest v5e slice per stage instead")
    p.add_argument("--reports", default="", help="JSONL of every compile (default: a temporary file)")
    args = p.parse_args()
    reports = args.reports or tempfile.mkstemp(suffix=".jsonl")[1]
    logs = Path(tempfile.mkdtemp(prefix="tpu_compile_"))
    stages = [int(s) for s in args.stages.split(",")]
    cases = []
    for stage in stages:
        if args.smallest:
            cases.append((stage, [f"--config={ROOT}/configs/allava_stage{stage}.py", "--topology=v5e", "--smallest",
                                  "--fit_micro_batch", "--config.model_overrides.attention=xla"]))
            continue
        for topology in args.topologies.split(","):
            if topology not in TOPOLOGIES:
                sys.exit(f"unknown slice {topology}")
            for attention in args.attention.split(","):
                cases.append((stage, case_flags(stage, topology, attention, args.rows_per_chip)))

    def one(i_case: tuple[int, tuple[int, list[str]]]) -> tuple[int, int]:
        i, (stage, flags) = i_case
        stage_reports = f"{reports}.stage{stage}"
        rc = run(flags, stage_reports, logs / f"{i:02d}.log")
        print(f"case {i}: stage {stage} {' '.join(flags[1:])}: rc {rc}, log {logs / f'{i:02d}.log'}", flush=True)
        return i, rc

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, enumerate(cases)))
    rows = []
    for stage in stages:
        path = Path(f"{reports}.stage{stage}")
        if path.exists():
            rows += [{"stage": stage, **json.loads(line)} for line in path.read_text().splitlines()]
    print(f"\nphi2_clip336, seq 2048, bf16, remat full, vision frozen; global batch 256 (stage 1) / 128 (stage 2); "
          f"per chip, libtpu 0.0.42.1 AOT (reports: {reports}.stage*)")
    print(table(rows))


if __name__ == "__main__":
    main()
