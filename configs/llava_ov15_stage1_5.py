"""python -m allava_jax.train --config configs/llava_ov15_stage1_5.py:/data/ov15 --workdir runs/ov15_s1_5 --config.init_from=runs/ov15_s1

LLaVA-OneVision-1.5 stage 1.5 (mid-training), the authors' recipe: the concept-balanced
mid-training mix (85M samples; their quick start: 3M) in the record layout our sources read; every
parameter trained except RICE-ViT's class token and its rotary angles (frozen, as in the authors'
training); AdamW lr 1e-5, weight decay 0.01, betas 0.9 / 0.95; warmup 0.2 %, cosine to 1e-6;
clipping 1.0; bf16, full recompute; packed 8192-token rows under the two budgets of stage 1; global
batch 112 rows, ~70K steps for the 85M samples (~8M rows). Starts from stage 1's checkpoint
(``init_from`` = stage 1's workdir).
"""

import importlib.util
import pathlib

from ml_collections import ConfigDict

_spec = importlib.util.spec_from_file_location("llava_ov15_stage1", pathlib.Path(__file__).with_name("llava_ov15_stage1.py"))
_stage1 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_stage1)
FROZEN_CLASS_TOKEN = _stage1.FROZEN_CLASS_TOKEN


def get_config(arg: str | None = None) -> ConfigDict:
    root = arg or "/data/ov15"
    c = _stage1.get_config(root)
    c.init_from = ""  # required: --config.init_from=runs/ov15_s1
    c.total_steps = 70000
    c.checkpoint_every = 1000
    c.data.sources = ({"name": "ov15_mid_training", "path": f"{root}/mid_training/mid_training.jsonl",
                       "image_root": f"{root}/mid_training"},)
    # 16 rows a forward/backward, 7 accumulated: one row per chip on v5e-16, the smallest v5e slice
    # this stage fits (docs/llava_ov15_training.md); 4 on v6e-4 / v5p-8.
    c.micro_batch_size = 16
    c.optim.lr = 1e-5
    c.optim.weight_decay = 0.01
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.param_rules = (*FROZEN_CLASS_TOKEN, (".*", 1.0))
    return c
