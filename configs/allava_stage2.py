"""python -m allava_jax.train --config configs/allava_stage2.py:/data/allava --workdir runs/s2 --config.init_from=runs/s1

ALLaVA stage 2 (instruction tuning), the paper's recipe: ALLaVA-Instruct-4V (LAION + VFLAN) and
llava_instruct_657K, mixed with 1 copy of the text data; starts from stage 1's final checkpoint
(``init_from`` = stage 1's workdir); CLIP frozen; AdamW (weight decay 0), 3 % warmup, cosine
2e-5 -> 2e-6; global batch 128; max length 2048; bf16 compute.
"""

from ml_collections import ConfigDict

from allava_jax.train.config import base_config

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("allava_stage1", pathlib.Path(__file__).with_name("allava_stage1.py"))
_stage1 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_stage1)


def get_config(arg: str | None = None) -> ConfigDict:
    root = arg or "/data/allava"
    c = base_config()
    c.init_from = ""  # required: --config.init_from=runs/s1
    # attention "auto": the splash kernel on TPU, XLA elsewhere (--config.model_overrides.attention=xla)
    c.model_overrides = ConfigDict({"dtype": "bfloat16", "remat_policy": "full", "attention": "auto"})
    c.batch_size = 128
    c.total_steps = 10500
    c.checkpoint_every = 500
    c.log_every = 10
    c.data.seq_len = 2048
    c.data.worker_count = 8
    c.data.sources = (
        {"name": "allava_instruct_laion", "path": f"{root}/allava_laion/ALLaVA-Instruct-LAION-4V.json", "image_root": root},
        {"name": "allava_instruct_vflan", "path": f"{root}/allava_vflan/ALLaVA-Instruct-VFLAN-4V.json", "image_root": root},
        {"name": "llava_instruct_657k", "path": f"{root}/llava/llava_v1_5_mix665k.json", "image_root": f"{root}/llava"},
        *_stage1.text_sources(root, copies=1),
    )
    c.param_rules = (("vision/.*", None), (".*", 1.0))
    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    return c
