"""python -m allava_jax.train --config configs/llava_ov15_stage2.py:/data/ov15 --workdir runs/ov15_s2 --config.init_from=runs/ov15_s1_5

LLaVA-OneVision-1.5 stage 2 (instruction tuning), the authors' recipe: their instruct data (22M
samples; quick start: 780K) in the record layout our sources read; every parameter trained except
the class token and its angles; AdamW lr 1e-5, weight decay 0, betas 0.9 / 0.99; warmup 0.2 %,
cosine to 1e-6; clipping 1.0; bf16, full recompute; unpacked (one sample per row, padded to the
row's 8192 tokens: a static shape) with each image's longest side first capped at 1000 px (the
authors' ``--image-resolution 1000``, then smart_resize). ``total_steps``: one epoch of the 780K
quick start at 112 rows per step. Starts from stage 1.5's checkpoint.
"""

import importlib.util
import pathlib

from ml_collections import ConfigDict

_spec = importlib.util.spec_from_file_location("llava_ov15_stage1_5", pathlib.Path(__file__).with_name("llava_ov15_stage1_5.py"))
_stage1_5 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_stage1_5)


def get_config(arg: str | None = None) -> ConfigDict:
    root = arg or "/data/ov15"
    c = _stage1_5.get_config(root)
    c.init_from = ""  # required: --config.init_from=runs/ov15_s1_5
    c.total_steps = 7000
    c.checkpoint_every = 500
    c.data.packing = "none"
    c.data.max_image_side = 1000
    c.data.sources = ({"name": "ov15_instruct", "path": f"{root}/instruct/instruct.jsonl", "image_root": f"{root}/instruct"},)
    c.optim.weight_decay = 0.0
    c.optim.b1, c.optim.b2 = 0.9, 0.99
    return c
