"""The training config's defaults: every knob of a run in one ``ml_collections.ConfigDict``.

Sequences are tuples so that they can be overridden on the command line
(``--config.stages='()'``).

Config files in ``configs/`` start from ``base_config()`` and change what their run needs.
"""

from __future__ import annotations

from ml_collections import ConfigDict


def base_config() -> ConfigDict:
    c = ConfigDict()
    # Model: a preset (allava_jax.models.config.PRESETS) unless init_from names a checkpoint.
    c.model = "phi2_clip336"
    c.model_overrides = ConfigDict({"dtype": "bfloat16", "remat_policy": "none", "attention": "auto"})
    c.init_from = ""  # `convert import` output, or a previous stage's workdir / checkpoints
    c.tokenizer = ""  # local directory; default: init_from's tokenizer

    c.total_steps = 1000
    c.batch_size = 256  # global rows per optimizer step
    c.micro_batch_size = 0  # rows per forward/backward (0 = batch_size); accumulates the rest
    # The LM head runs on loss positions only, gathered per device into at most this share of its
    # token slots; a batch with more loss positions falls back to every position (same loss).
    # 0 = always every position.
    c.logits_fraction = 0.5
    # Positions the LM head scores at a time (0 = all at once): one [rows, chunk, vocab] block of
    # logits at a time, recomputed in the backward pass; for large vocabularies at long rows.
    c.logits_chunk = 0
    c.checkpoint_every = 500  # steps between permanent checkpoints (and the last step)
    c.keep_checkpoints = 3  # permanent checkpoints kept (0 = all)
    # Also save when this many minutes passed since the last save (checked at log steps): a
    # temporary checkpoint, deleted when the next one is saved. 0 = off.
    c.checkpoint_every_minutes = 0.0
    c.log_every = 10
    c.seed = 0
    # JAX's persistent compilation cache (local or gs://): a restart loads the step instead of
    # compiling it again. "" = off; JAX_COMPILATION_CACHE_DIR in the environment wins.
    c.compile_cache_dir = "~/.cache/allava_jax/jax_compile"
    # Log every thread's stack when no step finished for this long (a stuck collective). 0 = off;
    # armed after the first step (which includes compilation).
    c.hang_timeout_s = 1800.0

    # A jax.profiler trace of steps start_step .. start_step + num_steps - 1 (1-based) into
    # WORKDIR/profile (XProf / TensorBoard's profile plugin). num_steps 0 = off.
    c.profile = ConfigDict({"start_step": 0, "num_steps": 0, "all_hosts": False})
    # Weights & Biases beside TensorBoard: off while project is empty (wandb need not be installed).
    c.wandb = ConfigDict({"project": "", "entity": "", "name": "", "tags": ()})

    c.data = ConfigDict()
    c.data.sources = ()  # list of source dicts, see allava_jax/data/sources.py
    c.data.seq_len = 2048
    c.data.max_images_per_row = 4
    # Native-resolution (rice) models: vision patches per row, the second packing budget (a multiple
    # of 4; 0 = 4 * seq_len, which a row can never exceed); the longest image side is first capped
    # to max_image_side (0 = not capped; the authors' stage 2: 1000).
    c.data.max_patches_per_row = 0
    c.data.max_image_side = 0
    c.data.worker_count = 0
    c.data.packing = "best_fit"  # "best_fit" / "first_fit" online, "none" (one sample per row), or "offline" (rows of data.plan)
    c.data.plan = ""  # packing "offline": the output of python -m allava_jax.data plan
    c.data.packing_bins = 0  # rows packed at once (0 = max(rows per shard, 128)); more bins pack tighter
    c.data.num_shards = 0  # 0 = one per process; fix it to make losses independent of host count
    c.data.max_bad_fraction = 0.05

    c.eval = ConfigDict()
    c.eval.sources = ()
    c.eval.every = 0  # steps; 0 = never
    c.eval.batches = 8
    c.eval.batch_size = 8

    c.optim = ConfigDict()
    c.optim.lr = 2e-5
    c.optim.end_lr = 2e-6
    c.optim.warmup_fraction = 0.03
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.clip_norm = 1.0

    # (regex over "/"-joined param paths, lr multiplier or None = frozen); first match wins.
    c.param_rules = (("vision/.*", None), (".*", 1.0))

    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})  # within a slice (all devices on one host / pod)
    # Across the slices of a multi-slice TPU job (over DCN): data parallelism by default.
    c.mesh_dcn = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.num_devices = 0  # 0 = all
    c.axis_rules = ()  # empty = allava_jax.train.sharding.DEFAULT_RULES
    c.peak_flops_per_device = 0.0  # 0 = vendor table or a measured matmul rate

    c.demo_dir = ""  # set by configs/demo.py: generate the demo dataset there if absent
    c.demo_native = False  # configs/demo_ov15.py: the demo's images in several sizes (native resolution)
    c.stages = ()  # optional list of override dicts run in order (stage k+1 inits from stage k)
    # What a stage runs: "train", or "vision_pretrain" (train/vision_pretrain.py: a from-scratch rice
    # tower learns its images' caption words from their mean patch feature, with these settings).
    c.stage_kind = "train"
    c.vision_pretrain = ConfigDict({"epochs": 8, "lr": 2e-3, "batch_images": 32, "images_per_row": 4})
    return c
