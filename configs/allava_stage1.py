"""python -m allava_jax.train --config configs/allava_stage1.py:/data/allava --workdir runs/s1 --config.init_from=ckpt/phi2_clip336

ALLaVA stage 1 (alignment), the paper's recipe: ALLaVA-Caption-4V (LAION + VFLAN) and ShareGPT4V
captions, mixed with 2 copies of the text data (Evol-Instruct-GPT4-Turbo + OpenChat). CLIP frozen,
projector + Phi-2 trained; AdamW (weight decay 0), 3 % linear warmup, cosine 2e-5 -> 2e-6; global
batch 256; max length 2048; bf16 compute. ``init_from``: a ``python -m allava_jax.convert import
--vision CLIP_DIR --llm PHI2_DIR --out ckpt/phi2_clip336`` checkpoint.

Every backbone takes the same recipe: the checkpoint's own config picks it (``--llm`` a
StableLM-2-1.6B, Phi-3-mini-128k or Qwen1.5-1.8B directory for ``stablelm2_clip336``,
``phi3mini_clip336``, ``qwen2_clip336``); ``--config.model=PRESET`` only matters for a fresh model.

The argument after ``:`` is the data root holding the released files. ``total_steps`` is one epoch
of the full mixture at ~1.6 samples per packed 2048-token row: check your copy with
``python -m allava_jax.data check`` and adjust.
"""

from ml_collections import ConfigDict

from allava_jax.train.config import base_config


def text_sources(root: str, copies: int) -> list[dict]:
    return [
        {"name": "evol_instruct", "path": f"{root}/allava_text/Evol-Instruct-GPT4-Turbo-143K.json", "copies": copies},
        {"name": "openchat", "path": f"{root}/openchat/openchat_sharegpt4.json", "copies": copies},
    ]


def get_config(arg: str | None = None) -> ConfigDict:
    root = arg or "/data/allava"
    c = base_config()
    c.init_from = ""  # required: --config.init_from=... (a convert import checkpoint)
    # attention "auto": the splash kernel on TPU, XLA elsewhere (--config.model_overrides.attention=xla)
    c.model_overrides = ConfigDict({"dtype": "bfloat16", "remat_policy": "full", "attention": "auto"})
    c.batch_size = 256
    c.micro_batch_size = 0
    c.total_steps = 3300
    c.checkpoint_every = 250
    c.log_every = 10
    c.data.seq_len = 2048
    c.data.worker_count = 8
    c.data.sources = (
        {"name": "allava_caption_laion", "path": f"{root}/allava_laion/ALLaVA-Caption-LAION-4V.json", "image_root": root},
        {"name": "allava_caption_vflan", "path": f"{root}/allava_vflan/ALLaVA-Caption-VFLAN-4V.json", "image_root": root},
        {"name": "sharegpt4v_caption", "path": f"{root}/sharegpt4v/sharegpt4v_instruct_gpt4-vision_cap100k.json",
         "image_root": f"{root}/sharegpt4v"},
        *text_sources(root, copies=2),
    )
    c.param_rules = (("vision/.*", None), (".*", 1.0))
    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    return c
