"""python -m allava_jax.train --config tests/configs/tiny_train_ov15.py:DEMO_DIR --workdir WORKDIR

``tiny_train.py``'s run on the native-resolution side: the ``tiny_ov15`` model (rice tower, 2 x 2
merger, Qwen3 decoder, ``qwen2vl`` template) on the demo data's native variant
(``make_demo_dataset(native=True)``), images packed under a patch budget per row. The vision tower
is trained, so a resume must restore its params and optimizer state too.
"""

import runpy
from pathlib import Path

from ml_collections import ConfigDict


def get_config(arg: str | None = None) -> ConfigDict:
    c = runpy.run_path(str(Path(__file__).with_name("tiny_train.py")))["get_config"](arg)
    c.model = "tiny_ov15"
    c.data.max_patches_per_row = 128
    c.param_rules = ((".*", 1.0),)
    return c
