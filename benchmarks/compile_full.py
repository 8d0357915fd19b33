"""Full-size compile check: a backbone's stage-1 train step on 8 and 256 (fake) CPU devices.

    python benchmarks/compile_full.py [--model phi2_clip336|stablelm2_clip336|phi3mini_clip336|qwen2_clip336]
                                      [--devices 8,256] [--batch 256]

For each device count a child process sets
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX loads and compiles the stage-1
run (configs/allava_stage1.py with ``--model``'s preset, seq 2048, bf16 compute, remat "full",
vision frozen, AdamW + clipping, mesh fsdp=-1, up to 4 image slots per row) through
``allava_jax.train.compile.compile_step``, the step ``python -m allava_jax.train`` runs, from
abstract shapes only: no weight is ever allocated. (For a TPU topology, with libtpu:
``python -m allava_jax.train.compile --topology v5e-256``; this is its ``cpu:N`` fallback, over
several device counts and backbones.)

Global batch 256 rows: at 256 devices one row per device, no accumulation; at 8 devices
``--micro-rows`` rows per device per micro-batch (default 2, i.e. 16 micro-batches accumulated
inside the step). Reports per-device ``memory_analysis()`` and the analytic FLOPs
(``train_step_flops``); "fits 16 GiB" = args + outputs + temps - aliased <= 16 GiB (TPU v5e HBM).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


def child(n_devices: int, batch: int, micro_rows: int, model: str) -> dict:
    """One device count: ``allava_jax.train.compile``'s compile of the stage-1 step on fake CPU devices."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n_devices}").strip()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT))
    import dataclasses
    import importlib.util

    from allava_jax.train import compile as aot
    from allava_jax.train import flops as flops_lib

    spec = importlib.util.spec_from_file_location("stage1", ROOT / "configs" / "allava_stage1.py")
    stage1 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage1)
    cfg = stage1.get_config()
    with cfg.unlocked():
        cfg.model, cfg.batch_size = model, batch
        cfg.micro_batch_size = min(micro_rows, batch // n_devices) * n_devices  # global rows per micro-batch
    report = aot.compile_step(cfg, aot.cpu_target(f"cpu:{n_devices}"))
    mconf = aot.model_config(cfg)
    abstract = param_counts(mconf)
    one_image = flops_lib.train_step_flops(mconf, batch * cfg.data.seq_len, batch, cfg.data.seq_len, vision_trained=False)
    return {**dataclasses.asdict(report), "total": report.total, "devices": n_devices,
            "rows_per_device_micro": report.micro_batch // n_devices, "image_slots": cfg.data.max_images_per_row,
            "params": abstract["params"], "trainable": abstract["trainable"],
            "analytic_flops_per_device": report.flops_per_chip, "analytic_flops_1img_per_device": one_image / n_devices}


def param_counts(mconf) -> dict:
    """Parameter counts from shapes alone (all, and those the stage-1 rules train: not vision)."""
    import jax

    from allava_jax.train.state import boxed_abstract_params, strip_boxes

    tree = strip_boxes(boxed_abstract_params(mconf))
    count = lambda t: int(sum(x.size for x in jax.tree.leaves(t)))  # noqa: E731
    return {"params": count(tree), "trainable": count({k: v for k, v in tree.items() if k != "vision"})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="phi2_clip336", help="a full-size preset (the backbone)")
    parser.add_argument("--devices", default="8,256")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--micro-rows", type=int, default=2, help="rows per device per micro-batch")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=int, default=540, help="seconds per device count")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.batch, args.micro_rows, args.model)), flush=True)
        return

    results = []
    for n in [int(x) for x in args.devices.split(",")]:
        cmd = [sys.executable, __file__, "--child", str(n), "--batch", str(args.batch), "--micro-rows", str(args.micro_rows), "--model", args.model]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{n} devices: compile did not finish in {args.timeout} s", file=sys.stderr)
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{n} devices failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}", file=sys.stderr)
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        r["wall_s"] = time.perf_counter() - start
        results.append(r)

    if not results:
        sys.exit(1)
    r0 = results[0]
    print(
        f"\n{args.model} stage-1 train step (configs/allava_stage1.py): seq 2048, bf16 compute, remat full, vision frozen, "
        f"global batch {args.batch}, {r0['image_slots']} image slots per row; {r0['params'] / 1e9:.2f} B params "
        f"({r0['trainable'] / 1e9:.2f} B trained); per-device figures; nothing allocated"
    )
    print(
        "| devices (mesh) | micro-batch rows/device x accum | args GiB | outputs GiB | aliased GiB | temps GiB | "
        "code MiB | total GiB | fits 16 GiB | analytic TFLOP/device | lower + compile s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mesh = "x".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1"
        print(
            f"| {r['devices']} ({mesh}) | {r['rows_per_device_micro']} x {r['accum']} | {r['argument'] / GIB:.2f} | "
            f"{r['output'] / GIB:.2f} | {r['alias'] / GIB:.2f} | {r['temp'] / GIB:.2f} | {r['code'] / 2**20:.1f} | "
            f"{r['total'] / GIB:.2f} | {'yes' if r['total'] <= 16 * GIB else 'NO'} | "
            f"{r['analytic_flops_per_device'] / 1e12:.1f} ({r['analytic_flops_1img_per_device'] / 1e12:.1f} at 1 image/row) | "
            f"{r['lower_s']:.0f} + {r['compile_s']:.0f} |"
        )
    print(
        "\ntotal = args + outputs + temps - aliased (the donated state is aliased to the new state). Figures are XLA:CPU's "
        "buffer assignment for the SPMD-partitioned per-device program (a TPU compile fuses and lays out differently); "
        "XLA:CPU reports no generated-code size (0). The analytic figure is model FLOPs (6N per token + attention + "
        "frozen vision forward on every image slot), without remat's extra forward. For a TPU topology: "
        "python -m allava_jax.train.compile (libtpu)."
    )


if __name__ == "__main__":
    main()
