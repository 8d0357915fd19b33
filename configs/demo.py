"""python -m allava_jax.train --config configs/demo.py --workdir runs/demo

The built-in demo, end to end on a CPU in about 10 minutes: writes a synthetic ALLaVA-format
dataset (coloured shapes; captions; questions with detailed answers; text-only records) and a BPE
tokenizer to ``demo_data/`` if absent, trains stage 1 (captions + 2 copies of text) and stage 2
(instructions + 1 copy of text, from stage 1's weights) of the small ``demo`` model, then prints
held-out answer accuracy and sample answers.

No pretrained CLIP is reachable offline, so unlike the paper the demo trains its vision tower too.
"""

from ml_collections import ConfigDict

from allava_jax.data import demo
from allava_jax.train.config import base_config


def get_config(arg: str | None = None) -> ConfigDict:
    c = base_config()
    c.demo_dir = arg or "demo_data"
    c.model = "demo"
    # Unrolled layers: the faster setting on CPU (same params and results as the scan).
    c.model_overrides = ConfigDict({"dtype": "float32", "remat_policy": "none", "scan_layers": False})
    c.tokenizer = f"{c.demo_dir}/{demo.FILES['tokenizer']}"
    c.batch_size = 8
    c.log_every = 10
    c.checkpoint_every = 100
    c.keep_checkpoints = 1
    c.data.seq_len = 320
    c.data.max_images_per_row = 4
    c.data.num_shards = 1
    c.optim.lr = 1e-3
    c.optim.end_lr = 1e-4
    c.param_rules = ((".*", 1.0),)  # vision tower trained: no pretrained weights offline
    c.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.eval.sources = ({"name": "heldout", "path": f"{c.demo_dir}/{demo.FILES['heldout']}", "image_root": c.demo_dir},)
    c.eval.batches = 4
    c.eval.batch_size = 8
    c.stages = (
        {"name": "stage1", "total_steps": 250, "data": {"sources": tuple(demo.sources(c.demo_dir, stage=1))}},
        {"name": "stage2", "total_steps": 250, "eval": {"every": 250}, "data": {"sources": tuple(demo.sources(c.demo_dir, stage=2))}},
    )
    c.demo_questions = 120  # held-out questions answered and scored at the end
    return c
