"""python -m allava_jax.train --config configs/llava_ov15_stage1.py:/data/ov15 --workdir runs/ov15_s1 --config.init_from=ckpt/ov15_4b_stage0

LLaVA-OneVision-1.5 stage 1 (language-image alignment), the authors' recipe: LLaVA-558K
(``LLaVA-Pretrain/blip_laion_cc_sbu_558k.json``, the record layout our sources read); only the
2 x 2 merger trained (RICE-ViT and Qwen3 frozen: no gradient, no optimizer state); AdamW lr 1e-4,
weight decay 0, betas 0.9 / 0.99; warmup 0.2 %, cosine to 1e-6; gradient clipping 1.0; bf16 compute
and full recompute; packed 8192-token rows (online best-fit under two budgets: 8192 LLM tokens and
``max_patches_per_row`` vision patches; 16368 patches + 16 class-token slots = 16384 vision tokens,
a multiple of 128 for splash attention). ``init_from``: the authors' stage-0 model (RICE-ViT +
Qwen3 merged, random merger), e.g. ``python -m allava_jax.convert import`` of
LLaVA-OneVision-1.5-4B-stage0.

Global batch 112 rows (the authors' stage-1.5 figure; the facts page gives none for stage 1).
``total_steps`` is one epoch at ~16 samples per row: check your copy with
``python -m allava_jax.data check`` and adjust. Stage 1.5 (``llava_ov15_stage1_5.py``) and stage 2
(``llava_ov15_stage2.py``) start from this stage's checkpoint in turn.
"""

from ml_collections import ConfigDict

from allava_jax.train.config import base_config

# The class token and its rotary angles are buffers in the authors' Megatron code: never trained.
FROZEN_CLASS_TOKEN = (("vision/class_embedding", None), ("vision/class_pos_emb", None))


def get_config(arg: str | None = None) -> ConfigDict:
    root = arg or "/data/ov15"
    c = base_config()
    c.model = "llava_ov15_4b"  # only for a fresh model; init_from's config wins
    c.init_from = ""  # required: --config.init_from=... (the stage-0 checkpoint)
    # attention "auto": the splash kernel on TPU (both towers), XLA elsewhere.
    c.model_overrides = ConfigDict({"dtype": "bfloat16", "remat_policy": "full", "attention": "auto"})
    c.batch_size = 112
    c.total_steps = 320
    c.checkpoint_every = 100
    c.log_every = 10
    c.data.seq_len = 8192
    # Qwen3's 151936-word head over 8192 positions is 4.6 GiB of float32 logits a row (twice that
    # with their gradient): scored 1024 positions at a time instead.
    c.logits_chunk = 1024
    c.data.packing = "best_fit"
    c.data.max_images_per_row = 16
    c.data.max_patches_per_row = 16368
    c.data.worker_count = 8
    c.data.sources = ({"name": "llava_pretrain_558k", "path": f"{root}/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
                       "image_root": f"{root}/LLaVA-Pretrain/images"},)
    c.optim.lr = 1e-4
    c.optim.end_lr = 1e-6
    c.optim.warmup_fraction = 0.002
    c.optim.weight_decay = 0.0
    c.optim.b1, c.optim.b2 = 0.9, 0.99
    c.optim.clip_norm = 1.0
    c.param_rules = (("projector/.*", 1.0), (".*", None))  # the merger only
    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    return c
