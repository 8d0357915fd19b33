"""Ahead-of-time compile of a run's train step for a TPU slice or GPU nodes, on any host (no
accelerator needed).

    python -m allava_jax.train.compile --config configs/allava_stage1.py --topology v5e-256
    python -m allava_jax.train.compile --config configs/allava_stage2.py --topology v5e-16 --num_slices 2
    python -m allava_jax.train.compile --config configs/allava_stage1.py --topology v5e --smallest --fit_micro_batch
    python -m allava_jax.train.compile --config configs/allava_stage1.py --topology h100-8   # 8 x H100 (one node)
    python -m allava_jax.train.compile --config configs/allava_stage1.py --topology 2xh100-8 # two such nodes
    python -m allava_jax.train.compile --config configs/allava_stage1.py --topology cpu:8   # no compiler: fake CPU devices

The step is the one ``python -m allava_jax.train`` runs (``loop.setup_step``: same model, optimizer,
param rules, shardings, accumulation), lowered from abstract shapes only, so nothing is allocated:
the target's own compiler builds the real executable for the topology's compile-only devices, as
MaxText's ``train_compile.py`` does, and its ``memory_analysis()`` says what each device needs.
TPUs: libtpu (``pip install "jax[tpu]==0.10.2"``). NVIDIA GPUs: XLA's GPU compiler in the jax
CUDA plugin, deviceless, from a device spec kept in ``gpu_specs/`` (``pip install -r
requirements-gpu.txt``: the plugin and ptxas, no CUDA runtime). The exit status is 0 when the step
fits the device's memory, 1 when it does not (with what to change), 2 for a bad flag or config.

``--fit_micro_batch`` finds the largest micro-batch that fits among the configured one and its
halvings; ``--smallest`` tries the generation's slices from the smallest up and stops at the first
that fits (both by compiling, never by arithmetic).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from absl import app, flags
from ml_collections import ConfigDict, config_flags

from allava_jax import compile_cache
from allava_jax.errors import UserError, report_user_errors
from allava_jax.train.cli import load_config, parse_flags

GIB = 1024**3

# Named slices (Cloud TPU's names: v4 and v5p count TensorCores, two per chip; v5e and v6e count
# chips) -> (libtpu topology, HBM per chip in GiB). v4 and v5p run one device per chip (megacore).
# Single-chip hosts (v5e-1) need other host bounds than libtpu's default 2x2x1; not listed.
TOPOLOGIES: dict[str, tuple[str, float]] = {
    "v4-8": ("v4:2x2x1", 32), "v4-16": ("v4:2x2x2", 32), "v4-32": ("v4:2x2x4", 32), "v4-64": ("v4:2x4x4", 32),
    "v4-128": ("v4:4x4x4", 32), "v4-256": ("v4:4x4x8", 32),
    "v5e-4": ("v5e:2x2", 16), "v5e-8": ("v5e:2x4", 16), "v5e-16": ("v5e:4x4", 16),
    "v5e-32": ("v5e:4x8", 16), "v5e-64": ("v5e:8x8", 16), "v5e-128": ("v5e:8x16", 16), "v5e-256": ("v5e:16x16", 16),
    "v5p-8": ("v5p:2x2x1", 95), "v5p-16": ("v5p:2x2x2", 95), "v5p-32": ("v5p:2x2x4", 95), "v5p-64": ("v5p:2x4x4", 95),
    "v6e-4": ("v6e:2x2", 32), "v6e-8": ("v6e:2x4", 32), "v6e-16": ("v6e:4x4", 32),
    "v6e-32": ("v6e:4x8", 32), "v6e-64": ("v6e:8x8", 32), "v6e-128": ("v6e:8x16", 32), "v6e-256": ("v6e:16x16", 32),
}
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
MEGACORE = ("v4", "v5p")
CPU_HBM_GIB = 16  # the fake-device fallback: judged against a v5e chip

# NVIDIA GPU kinds -> their XLA device spec (a GpuTargetConfig text proto in gpu_specs/, each file
# says where its figures come from). Named like the slices: "h100-8" is one node of 8 GPUs (the
# PJRT GPU topology 1x1x8), "2xh100-8" two such nodes (2x1x8); the memory comes from the spec.
GPU_SPECS = {"a100": "a100_80.txtpb", "h100": "h100.txtpb", "h200": "h200.txtpb"}
SPECS_DIR = Path(__file__).with_name("gpu_specs")
for _gpu in GPU_SPECS:
    TOPOLOGIES.update({f"{_gpu}-{n}": (f"{_gpu}:1x1x{n}", 0) for n in (1, 2, 4, 8)})
    TOPOLOGIES.update({f"{nodes}x{_gpu}-8": (f"{_gpu}:{nodes}x1x8", 0) for nodes in (2, 4)})
# JAX's GPU allocator takes this share of each GPU's memory unless XLA_PYTHON_CLIENT_MEM_FRACTION
# says otherwise (JAX's GPU memory allocation docs); a step fits when its peak fits that share.
GPU_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Target:
    """What the step is compiled for."""

    name: str  # e.g. "v5e-256", "2 x v5e-16", "h100-8", "cpu:8"
    devices: tuple[Any, ...]
    hbm_bytes: float  # what one device's program may use
    device_bytes: float = 0  # GPUs: the whole memory, of which JAX's allocator takes hbm_bytes


@dataclasses.dataclass
class Report:
    """One compile: per-chip memory (bytes) from ``memory_analysis()``, times, analytic FLOPs."""

    target: str
    chips: int
    mesh: dict[str, int]
    batch: int
    micro_batch: int
    accum: int
    attention: str
    argument: int
    output: int
    alias: int
    temp: int
    code: int
    hbm: float
    lower_s: float
    compile_s: float
    flops_per_chip: float
    peak: int = 0  # the TPU or GPU compiler's peak (its buffer assignment); 0 on CPU
    oom: str = ""  # the TPU compiler's own out-of-memory verdict, when it refused the program
    platform: str = "tpu"  # of the target's devices: "tpu", "gpu" or "cpu"
    device_memory: float = 0  # GPUs: the whole memory, of which JAX's allocator takes ``hbm``
    note: str = ""  # how the compile departed from the compiler's defaults, if it had to

    @property
    def total(self) -> int:
        """Per-device memory at the peak: the compiler's figure, else arguments + outputs + temps
        - aliased (the donated state is aliased to the new one)."""
        return self.peak or self.argument + self.output + self.temp - self.alias

    @property
    def fits(self) -> bool:
        return not self.oom and self.total <= self.hbm


def generation(topology: str) -> str:
    """"v5e" of v5e-256 and v5e:16x16; "h100" of h100-8, 2xh100-8 and h100:1x1x8."""
    return re.sub(r"^\d+x", "", topology.split("-")[0].split(":")[0])


def device_count(name: str) -> int:
    """Devices of a named slice or node set (v4 and v5p names count two TensorCores per chip, and
    run one device per chip)."""
    if generation(name) in GPU_SPECS:
        return math.prod(int(n) for n in TOPOLOGIES[name][0].split(":")[1].split("x"))
    n = int(name.split("-")[1])
    return n // 2 if generation(name) in MEGACORE else n


def known_topologies() -> str:
    return ", ".join(TOPOLOGIES)


def tpu_target(topology: str, num_slices: int = 1) -> Target:
    """Compile-only devices for a named slice (``v5e-256``) or a libtpu topology (``v5e:16x16``)."""
    libtpu_name, hbm = TOPOLOGIES.get(topology, (topology, None))
    gen = generation(libtpu_name)
    if ":" not in libtpu_name or gen not in HBM_GIB:
        raise UserError(f"--topology {topology}: not a known slice or GPU node ({known_topologies()}) "
                        "nor a libtpu topology such as v5e:16x16")
    try:
        from jax.experimental import topologies
        import libtpu  # noqa: F401  (only to say what is missing)
    except ImportError:
        raise UserError('the TPU compiler is not installed: pip install "jax[tpu]==0.10.2" (libtpu), '
                        "or compile for fake CPU devices with --topology cpu:N") from None
    kwargs: dict[str, Any] = {"chip_config_name": "megacore"} if gen in MEGACORE else {}
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=libtpu_name, **kwargs).devices
    except Exception as e:  # libtpu's own message says what it refuses
        raise UserError(f"--topology {topology}: libtpu cannot make {libtpu_name}: {e}") from None
    name = topology if num_slices == 1 else f"{num_slices} x {topology}"
    return Target(name, tuple(devices), (hbm or HBM_GIB[gen]) * GIB)


def gpu_spec(gen: str) -> str:
    """The GpuTargetConfig text proto of a GPU kind (``gpu_specs/``)."""
    return (SPECS_DIR / GPU_SPECS[gen]).read_text()


def gpu_memory_fraction() -> float:
    """The share of a GPU's memory that JAX's allocator will take in the training run:
    XLA_PYTHON_CLIENT_MEM_FRACTION as that run would read it, else JAX's default."""
    value = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")
    try:
        fraction = float(value) if value else GPU_MEM_FRACTION
    except ValueError:
        fraction = -1.0
    if not 0 < fraction <= 1:
        raise UserError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={value}: a share of the GPU's memory in (0, 1], e.g. 0.9")
    return fraction


def gpu_compiler_installed() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:
        return False


def gpu_target(topology: str, num_slices: int = 1) -> Target:
    """Compile-only NVIDIA GPUs for a named node set (``h100-8``, ``2xh100-8``): XLA's GPU compiler
    from the jax CUDA plugin, deviceless, described by the kind's spec. ``num_slices`` multiplies
    the nodes. (The compile-only devices carry no node boundary, so ``mesh_dcn`` does not apply:
    the mesh is one flat grid in device order, nodes one after the other.)"""
    if topology not in TOPOLOGIES or generation(topology) not in GPU_SPECS:
        raise UserError(f"--topology {topology}: not a known slice or GPU node ({known_topologies()})")
    gen, shape = TOPOLOGIES[topology][0].split(":")
    nodes, hosts, per_host = (int(n) for n in shape.split("x"))
    fraction = gpu_memory_fraction()  # first: the plugin itself reads the variable, and fails on a bad one
    if not gpu_compiler_installed():
        raise UserError("the GPU compiler is not installed: pip install -r requirements-gpu.txt (the jax CUDA "
                        "plugin and ptxas), or compile for fake CPU devices with --topology cpu:N")
    from jax.experimental import topologies

    try:
        devices = topologies.get_topology_desc(platform="cuda", target_config=gpu_spec(gen),
                                               topology=f"{nodes * num_slices}x{hosts}x{per_host}").devices
    except Exception as e:  # the plugin's own message says what it refuses
        raise UserError(f"--topology {topology}: the jax CUDA plugin cannot make it: {e}") from None
    name = topology if num_slices == 1 else f"{num_slices} x {topology}"
    memory = int(re.search(r"device_memory_size:\s*(\d+)", gpu_spec(gen))[1])
    return Target(name, tuple(devices), memory * fraction, memory)


def make_target(topology: str, num_slices: int = 1) -> Target:
    """The compile-only devices that ``--topology`` names."""
    if topology.startswith("cpu:"):
        return cpu_target(topology)
    if generation(topology) in GPU_SPECS:
        return gpu_target(topology, num_slices)
    return tpu_target(topology, num_slices)


def cpu_target(topology: str) -> Target:
    """``cpu:N``: N fake CPU devices (needs XLA_FLAGS set before JAX starts; `main` does that)."""
    import jax

    n = int(topology.split(":")[1])
    if jax.device_count() != n:
        raise UserError(f"--topology {topology}: JAX has {jax.device_count()} CPU devices; set "
                        f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before it starts")
    return Target(topology, tuple(jax.devices()), CPU_HBM_GIB * GIB)


def model_config(cfg: ConfigDict) -> Any:
    """The run's model config without its tokenizer or checkpoint: the config of ``init_from`` when
    it is readable here, else the preset; then the overrides (shapes are all that matter)."""
    from allava_jax import checkpoints
    from allava_jax.models.config import get_preset

    base = checkpoints.load_config(cfg.init_from) if cfg.init_from and os.path.exists(cfg.init_from) else get_preset(cfg.model)
    return base.replace(**cfg.model_overrides.to_dict())


def abstract_batch(rows: int, seq_len: int, max_images: int, image_size: int, sharding: Any,
                   max_patches: int = 0) -> dict[str, Any]:
    """The batch contract as ``ShapeDtypeStruct``s (uint8-free: images enter as float32, as training
    feeds them); ``max_patches`` > 0: a native-resolution row's packed patch sequence instead."""
    import jax
    import jax.numpy as jnp

    shapes = {
        "tokens": ((rows, seq_len), jnp.int32), "targets": ((rows, seq_len), jnp.int32),
        "loss_mask": ((rows, seq_len), jnp.bool_), "segment_ids": ((rows, seq_len), jnp.int32),
        "positions": ((rows, seq_len), jnp.int32),
        "images": ((rows, max_images, image_size, image_size, 3), jnp.float32),
        "image_mask": ((rows, max_images), jnp.bool_),
    }
    if max_patches:
        del shapes["images"]
        shapes.update({"patches": ((rows, max_patches, 588), jnp.float32),
                       "patch_segments": ((rows, max_patches), jnp.int32),
                       "coords": ((rows, max_patches, 2), jnp.int32), "cls_segments": ((rows, max_images), jnp.int32)})
    return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in shapes.items()}


def compile_step(cfg: ConfigDict, target: Target) -> Report:
    """Lower and compile the run's train step for ``target``; the per-chip memory and timings."""
    import flax.linen as nn
    import jax

    from allava_jax.models import kernels
    from allava_jax.train.loop import setup_step
    from allava_jax.train.sharding import batch_sharding, batch_shards, make_mesh, rules_from_config
    from allava_jax.train.step import lower_train_step

    mconf = model_config(cfg)
    micro = cfg.micro_batch_size or cfg.batch_size
    if cfg.batch_size % micro:
        raise UserError(f"batch_size={cfg.batch_size} is not a multiple of micro_batch_size={micro}")
    mesh = make_mesh(dict(cfg.mesh), target.devices, dict(cfg.mesh_dcn))
    if micro % batch_shards(mesh):
        raise UserError(f"micro_batch_size={micro} rows cannot be split over the mesh's {batch_shards(mesh)} "
                        f"batch shards ({dict(mesh.shape)}): use a multiple of it, or put devices on the tensor axis")
    axis_rules = rules_from_config(cfg.axis_rules)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
        setup = setup_step(cfg, mconf, mesh, axis_rules, cfg.batch_size // micro)
        attention = kernels.resolve(mconf.attention, cfg.data.seq_len)  # what "auto" is on this target
        sharding = batch_sharding(mesh)
        batch = abstract_batch(cfg.batch_size, cfg.data.seq_len, cfg.data.max_images_per_row,
                               mconf.vision.image_size, sharding, _max_patches(cfg, mconf))
        lowered = lower_train_step(setup.step, setup.abstract, batch, setup.shardings, sharding)
        t_lower = time.perf_counter() - t0
        note = ""
        try:
            compiled = lowered.compile()
        except Exception as e:  # libtpu refuses a program that does not fit; anything else is a bug
            used = _hbm_oom(str(e))
            if used is not None:
                compiled = None
            elif target.devices[0].platform == "gpu" and _TRITON_GEMM_TILING in str(e):
                # Deviceless, XLA's GPU compiler cannot autotune; its untuned Triton GEMM tiling
                # fails on some fusions. Then the same program with cuBLAS GEMMs (other fusion
                # boundaries, the same model state and activations), told in the report.
                compiled = lowered.compile(compiler_options={"xla_gpu_enable_triton_gemm": False})
                note = "GEMMs through cuBLAS (the untuned Triton GEMM tiling failed deviceless)"
            else:
                raise
        t_compile = time.perf_counter() - t0 - t_lower
    figures = dict(target=target.name, chips=mesh.size, mesh=dict(mesh.shape), batch=cfg.batch_size, micro_batch=micro,
                   accum=cfg.batch_size // micro, attention=attention, hbm=target.hbm_bytes, lower_s=t_lower,
                   compile_s=t_compile, flops_per_chip=_step_flops(cfg, mconf, setup) / mesh.size,
                   platform=target.devices[0].platform, device_memory=target.device_bytes, note=note)
    if compiled is None:
        return Report(argument=0, output=0, alias=0, temp=0, code=0, peak=used[0],
                      oom=f"the TPU compiler ran out of HBM: {size(used[0])} needed, {size(used[1])} usable", **figures)
    mem = compiled.memory_analysis()
    compilers_peak = figures["platform"] in ("tpu", "gpu")  # XLA:CPU's peak counts the arguments only
    return Report(argument=mem.argument_size_in_bytes, output=mem.output_size_in_bytes, alias=mem.alias_size_in_bytes,
                  temp=mem.temp_size_in_bytes, code=mem.generated_code_size_in_bytes,
                  peak=mem.peak_memory_in_bytes if compilers_peak else 0, **figures)


_TRITON_GEMM_TILING = "Couldn't find output tile sizes that satisfy"
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# libtpu's two ways of saying a program does not fit: (needed, usable) in each.
_OOM_PATTERNS = (
    r"Ran out of memory in memory space hbm\. Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm",
    r"Ran out of memory on HBM, the total memory required for .*?\(([\d.]+)([KMGT])\) exceeds available HBM "
    r"\(([\d.]+)([KMGT])\)",
)


def _hbm_oom(message: str) -> tuple[int, int] | None:
    """(bytes needed, bytes usable) from libtpu's out-of-memory refusal, or None for any other error."""
    import re

    for pattern in _OOM_PATTERNS:
        m = re.search(pattern, message)
        if m is not None:
            return int(float(m[1]) * _UNITS[m[2]]), int(float(m[3]) * _UNITS[m[4]])
    return None


def _step_flops(cfg: ConfigDict, mconf: Any, setup: Any) -> float:
    """Analytic model FLOPs of the whole step, every token and image slot real (its upper bound)."""
    from allava_jax.train import flops as flops_lib

    vision_trained = any(p.startswith("vision/") for p in setup.trainable_paths)
    rows_images = cfg.batch_size * cfg.data.max_images_per_row
    # native resolution: every row's patch budget one image (attention's worst case)
    patches = [_max_patches(cfg, mconf)] * cfg.batch_size if _max_patches(cfg, mconf) else None
    return flops_lib.train_step_flops(mconf, cfg.batch_size * cfg.data.seq_len, rows_images, cfg.data.seq_len,
                                      vision_trained, image_patches=patches)


def _max_patches(cfg: ConfigDict, mconf: Any) -> int:
    """A native-resolution (rice) model's patches per row; 0 for a CLIP model."""
    from allava_jax.train import data as train_data

    return train_data.max_patches_per_row(cfg.data) if mconf.vision.kind == "rice" else 0


def micro_batches(cfg: ConfigDict, shards: int) -> list[int]:
    """``--fit_micro_batch``'s candidates: the configured micro-batch, halved while it still gives
    every batch shard a whole row."""
    micro, out = cfg.micro_batch_size or cfg.batch_size, []
    while micro >= shards and micro % shards == 0 and cfg.batch_size % micro == 0:
        out.append(micro)
        if micro % 2:
            break
        micro //= 2
    return out or [cfg.micro_batch_size or cfg.batch_size]


def slices_of(gen: str, start: str | None = None) -> list[str]:
    """A generation's named slices (a GPU kind's node sets), smallest first."""
    names = sorted((n for n in TOPOLOGIES if generation(n) == gen), key=device_count)
    return names[names.index(start):] if start else names


def size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= 0.1 * GIB else f"{n / 2**20:.1f} MiB"


def memory_limit(r: Report) -> str:
    """What the peak is judged against: the chip's HBM, or JAX's share of the GPU's memory."""
    if r.device_memory:
        return (f"{r.hbm / GIB:.1f} GiB ({r.hbm / r.device_memory:.0%} of the GPU's {r.device_memory / GIB:.1f} GiB: "
                "XLA_PYTHON_CLIENT_MEM_FRACTION)")
    return f"{r.hbm / GIB:.0f} GiB HBM"


def format_report(r: Report) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in r.mesh.items() if v > 1) or "1"
    unit = "GPU" if r.platform == "gpu" else "chip"
    lines = [
        f"{r.target}: {r.chips} {unit}s, mesh {mesh}; batch {r.batch} = micro-batch {r.micro_batch} x {r.accum}; "
        f"attention {r.attention}",
        f"  per {unit}: {r.oom}" if r.oom else f"  per {unit}: arguments {size(r.argument)}, outputs {size(r.output)}, "
        f"aliased {size(r.alias)}, temps {size(r.temp)}; generated code {size(r.code)}",
        f"  peak {size(r.total)} of {memory_limit(r)}: {'fits' if r.fits else 'DOES NOT FIT'}",
        f"  lower {r.lower_s:.0f} s + compile {r.compile_s:.0f} s; model FLOPs {r.flops_per_chip / 1e12:.1f} TFLOP "
        f"per {unit} per step (analytic, every token and image slot real)",
        *([f"  note: {r.note}"] if r.note else []),
    ]
    return "\n".join(lines)


def advice(r: Report) -> str:
    """What to change when a step does not fit."""
    tips = []
    if r.micro_batch > r.mesh.get("data", 1) * r.mesh.get("fsdp", 1):
        tips.append(f"a smaller micro-batch (--config.micro_batch_size={r.micro_batch // 2}, accumulating the "
                    "rest; --fit_micro_batch finds one)")
    if r.device_memory and r.hbm < 0.95 * r.device_memory:
        tips.append(f"a larger share of the GPU's memory for JAX (XLA_PYTHON_CLIENT_MEM_FRACTION={r.hbm / r.device_memory:.2f} "
                    "now; e.g. 0.95, for this command and for the training run alike)")
    if r.attention == "xla" and r.platform in ("tpu", "gpu"):
        tips.append("the attention kernel (--config.model_overrides.attention=auto, on sequences of whole 128-token "
                    "tiles)")
    tips.append('recomputation (--config.model_overrides.remat_policy=full) if it is not on')
    unit = "GPU" if r.platform == "gpu" else "chip"
    tips.append(f"more {unit}s (a larger --topology, --smallest finds the first that fits) with the weights on "
                "fsdp (--config.mesh.fsdp=-1)")
    tips.append("tensor parallelism for the activations (--config.mesh.tensor=2 or 4)")
    return (f"the step needs {size(r.total)} per {unit}, {r.target} has {memory_limit(r)}. Try: "
            + "; ".join(tips) + ".")


_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (get_config()).", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "v5e-256, v4-32, v5e:16x16, ...; GPU nodes: a100-8, h100-8, "
                                "h200-8, 2xh100-8, ...; a generation or GPU kind (v5e, h100) with --smallest; or "
                                "cpu:N (fake CPU devices, no accelerator compiler).", required=True)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices joined over DCN (mesh_dcn lays them out); for GPUs, "
                                   "how many of the named nodes.")
_SMALLEST = flags.DEFINE_bool("smallest", False, "Try the generation's slices from the smallest up.")
_FIT_MICRO = flags.DEFINE_bool("fit_micro_batch", False, "The largest micro-batch that fits (micro_batch_size "
                               "and its halvings).")
_REPORTS = flags.DEFINE_string("reports", "", "Append each compile's figures to this JSONL file.")


def _targets(topology: str, num_slices: int, smallest: bool) -> list[str]:
    if topology.startswith("cpu:"):
        return [topology]
    if smallest:
        gen = generation(topology)
        if gen not in HBM_GIB and gen not in GPU_SPECS:
            raise UserError(f"--smallest --topology {topology}: name a generation or GPU kind "
                            f"({', '.join([*HBM_GIB, *GPU_SPECS])})")
        return slices_of(gen, topology if topology in TOPOLOGIES else None)
    return [topology]


def search(cfg: ConfigDict, topologies: Sequence[str], num_slices: int, fit_micro: bool,
           out: Any = sys.stdout, reports: str = "") -> tuple[Report | None, Report]:
    """Compile for each topology in turn until the step fits: (the fitting report or None, the
    last report). With ``fit_micro`` each topology is first compiled at the smallest micro-batch
    (if that does not fit, nothing does), then the largest that fits is found by bisection
    (memory grows with the micro-batch). Every compile is printed as it finishes."""
    from allava_jax.train.sharding import batch_shards, make_mesh

    def compile_at(target: Target, micro: int) -> Report:
        run = cfg.copy_and_resolve_references()
        with run.unlocked():
            run.micro_batch_size = micro
        report = compile_step(run, target)
        print(format_report(report), file=out, flush=True)
        if reports:
            with open(reports, "a") as f:
                f.write(json.dumps({**dataclasses.asdict(report), "total": report.total, "fits": report.fits}) + "\n")
        return report

    for topology in topologies:
        target = make_target(topology, num_slices)
        if not fit_micro:
            last = compile_at(target, cfg.micro_batch_size)
            if last.fits:
                return last, last
            continue
        candidates = micro_batches(cfg, batch_shards(make_mesh(dict(cfg.mesh), target.devices, dict(cfg.mesh_dcn))))
        last = best = compile_at(target, candidates[-1])
        if not best.fits:
            continue
        lo, hi = 0, len(candidates) - 1  # candidates[hi] fits; find the first (largest) that does
        while lo < hi:
            mid = (lo + hi) // 2
            last = compile_at(target, candidates[mid])
            if last.fits:
                hi, best = mid, last
            else:
                lo = mid + 1
        return best, last
    return None, last


@report_user_errors
def main(argv: list[str]) -> int:
    del argv
    topology = _TOPOLOGY.value
    if topology.startswith("cpu:"):
        n = topology.split(":")[1]
        if not n.isdigit():
            raise UserError(f"--topology {topology}: cpu:N with N a device count")
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: no local accelerator is used
    # libtpu takes a host-wide lock for the TPU it drives; a compile-only process drives none, so
    # it may run beside a training job or another compile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    cfg = load_config(_CONFIG)
    if generation(topology) not in GPU_SPECS:
        # A deviceless GPU executable cannot be loaded back without a GPU client: the cache would
        # only warn on every later compile of the same program.
        compile_cache.enable(cfg.compile_cache_dir)
    found, last = search(cfg, _targets(topology, _NUM_SLICES.value, _SMALLEST.value), _NUM_SLICES.value,
                         _FIT_MICRO.value, reports=_REPORTS.value)
    if found is None:
        print(f"error: does not fit: {advice(last)}", file=sys.stderr)
        return 1
    print(f"fits: {found.target}, micro-batch {found.micro_batch} x {found.accum}, "
          f"{size(found.total)} of {memory_limit(found)} per {'GPU' if found.platform == 'gpu' else 'chip'}")
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
