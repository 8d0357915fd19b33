"""Full-size compile check: a backbone's stage-1 train step on 8 and 256 (fake) CPU devices.

    python benchmarks/compile_full.py [--model phi2_clip336|stablelm2_clip336|phi3mini_clip336|qwen2_clip336]
                                      [--devices 8,256] [--batch 256]

For each device count a child process sets
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX loads, builds the stage-1 run
(configs/allava_stage1.py with ``--model``'s preset, seq 2048, bf16 compute, remat "full", vision frozen,
AdamW + clipping, mesh fsdp=-1, up to 4 image slots per row) exactly as
``allava_jax.train.loop.train`` does, but from abstract shapes only: ``state_shardings`` gives the
state as ``jax.ShapeDtypeStruct``s with their shardings, the batch is ``ShapeDtypeStruct``s
sharded over (data, fsdp), and ``lower_train_step(...).compile()`` builds the SPMD executable. No
weight is ever allocated.

Global batch 256 rows: at 256 devices one row per device, no accumulation; at 8 devices
``--micro-rows`` rows per device per micro-batch (default 2, i.e. 16 micro-batches accumulated
inside the step). Reports per-device ``memory_analysis()`` and FLOPs (XLA ``cost_analysis()`` and
the analytic ``train_step_flops``); "fits 16 GiB" = args + outputs + temps - aliased <= 16 GiB
(TPU v5e HBM). XLA's CPU cost analysis counts a while-loop body once, not times its trip count,
so with the layers scanned its FLOP figure is far below the real count: compare with the analytic.
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
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n_devices}").strip()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT))
    import importlib.util

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from allava_jax.models.config import get_preset
    from allava_jax.train import flops as flops_lib
    from allava_jax.train.loop import setup_step
    from allava_jax.train.sharding import batch_sharding, make_mesh, rules_from_config
    from allava_jax.train.step import lower_train_step

    spec = importlib.util.spec_from_file_location("stage1", ROOT / "configs" / "allava_stage1.py")
    stage1 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage1)
    cfg = stage1.get_config()
    assert jax.device_count() == n_devices, jax.device_count()

    mconf = get_preset(model).replace(**cfg.model_overrides.to_dict())
    seq_len, m_images = cfg.data.seq_len, cfg.data.max_images_per_row
    size = mconf.vision.image_size
    mesh = make_mesh(dict(cfg.mesh), jax.devices())
    axis_rules = rules_from_config(cfg.axis_rules)
    per_device = batch // n_devices
    micro = min(micro_rows, per_device) * n_devices  # global rows per micro-batch
    accum = batch // micro

    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
        setup = setup_step(cfg, mconf, mesh, axis_rules, accum)
        abstract, shardings = setup.abstract, setup.shardings
        bs = batch_sharding(mesh)
        shapes = {
            "tokens": ((batch, seq_len), jnp.int32),
            "targets": ((batch, seq_len), jnp.int32),
            "loss_mask": ((batch, seq_len), jnp.bool_),
            "segment_ids": ((batch, seq_len), jnp.int32),
            "positions": ((batch, seq_len), jnp.int32),
            "images": ((batch, m_images, size, size, 3), jnp.float32),
            "image_mask": ((batch, m_images), jnp.bool_),
        }
        abstract_batch = {k: jax.ShapeDtypeStruct(s, d, sharding=bs) for k, (s, d) in shapes.items()}
        lowered = lower_train_step(setup.step, abstract, abstract_batch, shardings, bs)
        t_lower = time.perf_counter() - t0
        compiled = lowered.compile()
        t_compile = time.perf_counter() - t0 - t_lower

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    n_params = sum(x.size for x in jax.tree.leaves((abstract.trainable, abstract.frozen)))
    n_trainable = sum(x.size for x in jax.tree.leaves(abstract.trainable))
    # Analytic: every token slot real, every image slot computed (the step encodes all M slots).
    analytic = flops_lib.train_step_flops(mconf, batch * seq_len, batch * m_images, seq_len, vision_trained=False)
    one_image = flops_lib.train_step_flops(mconf, batch * seq_len, batch, seq_len, vision_trained=False)
    out = {
        "devices": n_devices,
        "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
        "batch": batch,
        "rows_per_device_micro": micro // n_devices,
        "accum": accum,
        "image_slots": m_images,
        "params": int(n_params),
        "trainable": int(n_trainable),
        "lower_s": t_lower,
        "compile_s": t_compile,
        "argument": mem.argument_size_in_bytes,
        "output": mem.output_size_in_bytes,
        "alias": mem.alias_size_in_bytes,
        "temp": mem.temp_size_in_bytes,
        "code": mem.generated_code_size_in_bytes,
        "xla_flops": float(cost.get("flops", float("nan"))) if cost else float("nan"),
        "analytic_flops_per_device": analytic / n_devices,
        "analytic_flops_1img_per_device": one_image / n_devices,
    }
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


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
        "code MiB | total GiB | fits 16 GiB | XLA flops/device | analytic TFLOP/device | lower + compile s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mesh = "x".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1"
        print(
            f"| {r['devices']} ({mesh}) | {r['rows_per_device_micro']} x {r['accum']} | {r['argument'] / GIB:.2f} | "
            f"{r['output'] / GIB:.2f} | {r['alias'] / GIB:.2f} | {r['temp'] / GIB:.2f} | {r['code'] / 2**20:.1f} | "
            f"{r['total'] / GIB:.2f} | {'yes' if r['total'] <= 16 * GIB else 'NO'} | {r['xla_flops'] / 1e12:.2f} T | "
            f"{r['analytic_flops_per_device'] / 1e12:.1f} ({r['analytic_flops_1img_per_device'] / 1e12:.1f} at 1 image/row) | "
            f"{r['lower_s']:.0f} + {r['compile_s']:.0f} |"
        )
    print(
        "\ntotal = args + outputs + temps - aliased (the donated state is aliased to the new state). Figures are XLA:CPU's "
        "buffer assignment for the SPMD-partitioned per-device program (a TPU compile fuses and lays out differently); "
        "XLA:CPU reports no generated-code size (0). XLA flops count each while-loop body (layer scan, accumulation "
        "scan) once; the analytic figure is model FLOPs (6N per token + attention + frozen vision forward on every "
        "image slot), without remat's extra forward."
    )


if __name__ == "__main__":
    main()
