"""python -m allava_jax.train --config tests/configs/tiny_train.py:DEMO_DIR --workdir WORKDIR

A seconds-per-step run of the ``tiny`` model on a small demo dataset, for trainer tests (fp32).
"""

from ml_collections import ConfigDict

from allava_jax.data import demo
from allava_jax.train.config import base_config


def get_config(arg: str | None = None) -> ConfigDict:
    root = arg or "demo_data"
    c = base_config()
    c.model = "tiny"
    c.model_overrides = ConfigDict({"dtype": "float32", "remat_policy": "none", "text": {"vocab_size": 1024}})
    c.tokenizer = f"{root}/{demo.FILES['tokenizer']}"
    c.total_steps = 20
    c.batch_size = 8
    c.checkpoint_every = 5
    c.keep_checkpoints = 2
    c.log_every = 1
    c.data.seq_len = 128
    c.data.max_images_per_row = 4
    c.data.num_shards = 2
    c.data.packing_bins = 8
    c.data.sources = tuple(demo.sources(root, stage=2))
    c.optim.lr = 1e-3
    c.optim.end_lr = 1e-4
    c.optim.warmup_fraction = 0.1
    c.param_rules = (("vision/.*", None), (".*", 1.0))
    c.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    return c
